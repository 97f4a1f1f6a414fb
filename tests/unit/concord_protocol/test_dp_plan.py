"""The shared step plan is what Opacus' own classes execute, for every loader length."""

from __future__ import annotations

import math

import pytest

from concord_protocol.dp_plan import step_plan

opacus_sampler = pytest.importorskip("opacus.utils.uniform_sampler")


def test_every_loader_length_up_to_200000_matches_opacus_sampler() -> None:
    """For each k, the plan's steps are the length of the sampler Opacus builds at 1/k, and
    the accounted rate is 1/len(dp_loader), as ``make_private`` takes it."""
    off_by_one = []
    for k in range(1, 200_001):
        plan = step_plan(k, 1)  # batch 1: k loader batches
        sampler = opacus_sampler.UniformWithReplacementSampler(num_samples=k, sample_rate=1 / k)
        assert plan.loader_batches == k
        assert plan.sampling_rate == sampler.sample_rate
        assert plan.steps_per_epoch == len(sampler), k
        assert plan.sample_rate == 1 / len(sampler), k
        if plan.steps_per_epoch == k - 1:
            off_by_one.append(k)
    # The figures: 93, 99, 105, 117, ... and 11,740 such k up to 200,000.
    assert off_by_one[:4] == [93, 99, 105, 117]
    assert len(off_by_one) == 11_740


@pytest.mark.parametrize(("n", "batch"), [(186, 2), (2976, 32), (2945, 32), (40, 10), (41, 10)])
def test_loader_batches_are_ceil_of_n_over_batch(n: int, batch: int) -> None:
    plan = step_plan(n, batch)
    assert plan.loader_batches == math.ceil(n / batch)
    assert plan.sample_rate >= plan.sampling_rate  # never accounts a lower rate than it samples


@pytest.mark.parametrize(("n", "batch"), [(0, 1), (1, 0), (-3, 2)])
def test_bad_counts_are_refused(n: int, batch: int) -> None:
    with pytest.raises(ValueError, match="at least one record"):
        step_plan(n, batch)
