"""The evaluation histogram both roles share: layout, metrics and the release noise."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import create_accountant
from sklearn.metrics import roc_auc_score

from concord_protocol.contract import EvaluationSpec, PrivacySpec
from concord_protocol.eval_histograms import (
    HD95_EDGES,
    gaussian_delta,
    histogram,
    histogram_size,
    metrics,
    release_noise,
    segmentation_histogram,
)


def test_binary_histogram_puts_each_record_in_one_cell_and_recovers_accuracy_and_auc() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p1 = np.clip(0.5 * y + rng.normal(0.25, 0.2, 500), 0.0, 1.0)
    probs = np.stack([1 - p1, p1], axis=1)
    counts = histogram(y, probs, bins=50)
    assert counts.shape == (histogram_size(2, 50),) == (100,)
    assert counts.sum() == 500  # one cell per record: sensitivity 1
    m = metrics(counts, num_classes=2, bins=50)
    assert m["num-examples"] == 500
    assert m["accuracy"] == pytest.approx(float(((p1 >= 0.5) == y).mean()))
    # The binned AUC approaches the exact one as bins get finer.
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1), abs=0.01)


def test_a_probability_of_exactly_one_is_in_the_last_bin() -> None:
    counts = histogram([1, 0], [[0.0, 1.0], [1.0, 0.0]], bins=4)
    assert list(counts) == [1, 0, 0, 0, 0, 0, 0, 1]


def test_multiclass_histogram_is_a_confusion_matrix() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 2, 2, 1]]
    counts = histogram(y, probs, bins=4)
    assert counts.reshape(3, 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    m = metrics(counts, num_classes=3, bins=4)
    assert m == {"num-examples": 4.0, "accuracy": 0.5}


def test_noisy_counts_are_clipped_and_undefined_metrics_left_out() -> None:
    assert metrics([-3.0, -1.0, -2.0, -0.5], num_classes=2, bins=2) == {"num-examples": 0.0}
    only_negatives = metrics([5.0, 1.0, -2.0, -0.5], num_classes=2, bins=2)
    assert only_negatives["accuracy"] == pytest.approx(5 / 6)
    assert "auc" not in only_negatives
    with pytest.raises(ValueError, match="layout"):
        metrics([1.0, 2.0], num_classes=2, bins=2)
    with pytest.raises(ValueError, match="non-finite"):
        metrics([1.0, math.nan, 0.0, 0.0], num_classes=2, bins=2)


@pytest.mark.parametrize(("epsilon", "releases"), [(0.6, 3), (0.2, 5), (2.0, 1), (1.0, 10)])
def test_release_noise_meets_its_epsilon_by_opacus_accountant(
    epsilon: float, releases: int
) -> None:
    """The closed-form GDP calibration agrees with an independent accountant (Opacus PRV):
    ``releases`` Gaussian releases at that noise cost at most ``epsilon``, and barely less."""
    sigma = release_noise(epsilon, 1e-5, releases)
    assert gaussian_delta(epsilon, math.sqrt(releases) / sigma) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = create_accountant(mechanism="prv")
        accountant.history = [(sigma, 1.0, releases)]
        spent = accountant.get_epsilon(delta=1e-5)
    assert spent == pytest.approx(epsilon, abs=0.02)


def test_the_contract_derives_the_noise_from_its_epsilon_share_or_takes_it_as_given() -> None:
    privacy = PrivacySpec(epsilon=3.0, delta=1e-5)
    spec = EvaluationSpec()
    assert spec.noise(privacy, 3) == release_noise(0.6, 1e-5, 3)
    assert EvaluationSpec(noise_multiplier=7.5).noise(privacy, 3) == 7.5
    assert EvaluationSpec(mode="none").noise(privacy, 3) is None
    with pytest.raises(ValueError, match="even"):
        EvaluationSpec(score_bins=3)


def test_segmentation_histogram_counts_each_record_once_and_recovers_dice_and_hd95() -> None:
    rng = np.random.default_rng(3)
    dice = rng.beta(5, 2, 400)
    hd95 = rng.gamma(2.0, 3.0, 400)
    counts = segmentation_histogram(dice, hd95, bins=20)
    assert counts.shape == (histogram_size(2, 20, "segmentation"),) == (20 * len(HD95_EDGES),)
    assert counts.sum() == 400  # one cell per record: sensitivity 1
    m = metrics(counts, num_classes=2, bins=20, task="segmentation")
    assert m["num-examples"] == 400
    assert abs(m["dice"] - dice.mean()) <= 0.5 / 20  # at most half a bin off
    # The median, interpolated inside its bin, lies in the true median's bin.
    true_median = float(np.median(hd95))
    b = int(np.searchsorted(HD95_EDGES, true_median, side="right")) - 1
    assert HD95_EDGES[b] <= m["hd95"] <= HD95_EDGES[b + 1]


def test_one_record_moves_one_segmentation_cell_by_one() -> None:
    dice, hd95 = np.array([0.2, 0.7, 1.0]), np.array([0.0, 3.0, 1e9])
    before = segmentation_histogram(dice, hd95, bins=4)
    after = segmentation_histogram(np.append(dice, 0.99), np.append(hd95, 70.0), bins=4)
    assert np.abs(after - before).sum() == 1
    grid = before.reshape(4, len(HD95_EDGES))
    assert grid[0, 0] == grid[2, 2] == grid[3, -1] == 1  # HD95 of 1e9: the open last bin


@pytest.mark.parametrize(
    ("dice", "hd95"),
    [([0.5], [float("nan")]), ([float("inf")], [1.0]), ([0.5, 0.5], [1.0]), ([[0.5]], [[1.0]])],
)
def test_segmentation_histogram_refuses_undefined_scores(dice: list, hd95: list) -> None:
    with pytest.raises(ValueError, match="finite"):
        segmentation_histogram(dice, hd95, bins=4)


def test_segmentation_metrics_refuse_a_classification_layout() -> None:
    with pytest.raises(ValueError, match="layout"):
        metrics([1.0] * 8, num_classes=2, bins=4, task="segmentation")
    assert metrics([0.0] * 32, num_classes=2, bins=4, task="segmentation") == {"num-examples": 0.0}
