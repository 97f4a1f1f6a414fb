"""The DP-SGD step plan of one site: how many steps an epoch takes, at what sample rate.

Both roles compute it: a site plans and accounts its training with it, the consortium server
recomputes from the contract and a site's count what that site should have spent (the
ledger's cross-check). It must therefore be *exactly* what Opacus executes, for every
dataset size and batch size, so it lives here once and imports nothing of either role.

What Opacus does with ``make_private(..., poisson_sampling=True)`` on a data loader of
``k = ceil(n / batch_size)`` batches (opacus 1.6, ``privacy_engine.py`` and
``data_loader.py``):

1. ``DPDataLoader.from_data_loader`` samples each record with probability ``1 / k`` and
   its ``UniformWithReplacementSampler`` yields ``int(1 / (1 / k))`` batches per epoch. In
   floating point ``1 / (1 / k)`` is slightly below ``k`` for some ``k`` (93, 99, 105, 117,
   ...), and ``int`` truncates it to ``k - 1``.
2. ``make_private`` then takes the sample rate it gives the accountant as
   ``1 / len(dp_loader)``, that is ``1 / steps``, which is ``1 / (k - 1)`` for those ``k``.

So an epoch is ``steps = int(1 / (1 / k))`` steps, each accounted at ``1 / steps``. Where
``steps == k - 1`` the accounted rate ``1 / (k - 1)`` is above the rate records are really
sampled at (``1 / k``): the accounting is then slightly pessimistic, never optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["StepPlan", "step_plan"]


@dataclass(frozen=True)
class StepPlan:
    """One epoch of DP-SGD over ``num_samples`` records in batches of ``batch_size``."""

    num_samples: int
    batch_size: int
    #: Batches of the plain data loader Opacus is given: ``ceil(n / batch_size)``.
    loader_batches: int
    #: Probability each record is in a batch (what Opacus' sampler draws with).
    sampling_rate: float
    #: Steps Opacus takes per epoch (its sampler's length).
    steps_per_epoch: int
    #: The sample rate Opacus' accountant records for each step: ``1 / steps_per_epoch``.
    sample_rate: float


def step_plan(num_samples: int, batch_size: int) -> StepPlan:
    """The plan Opacus executes for ``num_samples`` records in batches of ``batch_size``.

    Raises:
        ValueError: a count below 1.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError("DP training needs at least one record and a batch size of 1 or more")
    loader_batches = math.ceil(num_samples / batch_size)
    sampling_rate = 1 / loader_batches
    steps = int(1 / sampling_rate)  # UniformWithReplacementSampler.steps
    return StepPlan(
        num_samples=num_samples,
        batch_size=batch_size,
        loader_batches=loader_batches,
        sampling_rate=sampling_rate,
        steps_per_epoch=steps,
        sample_rate=1 / steps,  # PrivacyEngine.make_private: 1 / len(dp_data_loader)
    )
