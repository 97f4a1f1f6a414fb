"""Evaluation under differential privacy: the histogram a site releases and the metrics
computed from it.

Both roles use this module: a site bins its test-split predictions into
:func:`histogram` (then adds Gaussian noise to every cell, see
``site_node.privacy.dp_metrics``); the server sums the sites' noisy histograms and derives
accuracy, AUC and the test count with :func:`metrics`. The layout is fixed by the task and
the contract's :class:`~concord_protocol.contract.EvaluationSpec`:

* **binary** (2 classes): ``2 * bins`` cells, cell ``label * bins + b`` where ``b`` is the
  bin of the positive class' probability (``bins`` equal bins of [0, 1]; a probability of
  exactly 1 is in the last bin). ``bins`` is even, so "predicted positive" (probability at
  least 0.5) is exactly the upper half of the bins;
* **multi-class** (K > 2): ``K * K`` cells, cell ``label * K + predicted``;
* **segmentation**: ``bins * len(HD95_EDGES)`` cells, cell ``dice_bin * len(HD95_EDGES) +
  hd95_bin``, where ``dice_bin`` is the bin of the record's Dice (``bins`` equal bins of
  [0, 1]) and ``hd95_bin`` that of its HD95 in voxels (:data:`HD95_EDGES`, the last bin
  open-ended). Both are per-record scores (``site_node.training.segmentation``), so a
  record still counts in one cell; the metrics are the mean Dice (bin midpoints: at most
  half a bin off) and the median HD95 (interpolated inside its bin; the lower edge in the
  open last bin).

Every record counts in exactly one cell: adding or removing a record changes one cell by 1,
so the histogram has L2 sensitivity 1 and a Gaussian of standard deviation ``sigma`` on each
cell is the Gaussian mechanism with noise multiplier ``sigma``. Metrics read noisy counts
clipped at zero (post-processing: no further privacy cost).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "HD95_EDGES",
    "gaussian_delta",
    "histogram",
    "histogram_size",
    "metrics",
    "release_noise",
    "segmentation_histogram",
]

#: Lower edges of the HD95 bins, in voxels (the last bin, from 64 up, is open).
HD95_EDGES: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def histogram_size(num_classes: int, bins: int, task: str = "classification") -> int:
    """Cells of the released histogram for a task of ``num_classes`` classes."""
    if num_classes < 2:
        raise ValueError("a task has at least 2 classes (segmentation: with the background)")
    if task == "segmentation":
        return bins * len(HD95_EDGES)
    return 2 * bins if num_classes == 2 else num_classes * num_classes


def segmentation_histogram(
    dice: npt.ArrayLike, hd95: npt.ArrayLike, *, bins: int
) -> npt.NDArray[np.float64]:
    """Counts of the segmentation layout for each record's ``dice`` in [0, 1] and ``hd95``
    (voxels, non-negative)."""
    d = np.asarray(dice, dtype=np.float64)
    h = np.asarray(hd95, dtype=np.float64)
    if d.shape != h.shape or d.ndim != 1 or not (np.isfinite(d).all() and np.isfinite(h).all()):
        raise ValueError("dice and hd95 must be finite, one value of each per record")
    d = np.clip(d, 0.0, 1.0)
    dice_bin = np.minimum((d * bins).astype(np.int64), bins - 1)
    hd_bin = np.searchsorted(np.asarray(HD95_EDGES), np.maximum(h, 0.0), side="right") - 1
    cell = dice_bin * len(HD95_EDGES) + hd_bin
    return np.bincount(cell, minlength=bins * len(HD95_EDGES)).astype(np.float64)


def _segmentation_metrics(c: npt.NDArray[np.float64], bins: int, total: float) -> dict[str, float]:
    grid = c.reshape(bins, len(HD95_EDGES))
    per_dice = grid.sum(axis=1)
    midpoints = (np.arange(bins) + 0.5) / bins
    out = {"dice": float((per_dice * midpoints).sum() / total)}
    per_hd = grid.sum(axis=0)
    cumulative = np.cumsum(per_hd)
    b = int(np.searchsorted(cumulative, total / 2))
    lower = HD95_EDGES[b]
    if b + 1 < len(HD95_EDGES) and per_hd[b] > 0:
        before = cumulative[b] - per_hd[b]
        fraction = (total / 2 - before) / per_hd[b]
        lower += fraction * (HD95_EDGES[b + 1] - HD95_EDGES[b])
    out["hd95"] = float(lower)
    return out


def histogram(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, *, bins: int
) -> npt.NDArray[np.float64]:
    """Counts of the layout above for ``labels`` (N,) and class ``probabilities`` (N, K)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError("probabilities must be (records, classes) for as many records as labels")
    k = p.shape[1]
    if k == 2:
        cell = y * bins + np.minimum((p[:, 1] * bins).astype(np.int64), bins - 1)
    else:
        cell = y * k + p.argmax(axis=1)
    return np.bincount(cell, minlength=histogram_size(k, bins)).astype(np.float64)


def metrics(
    counts: Sequence[float], *, num_classes: int, bins: int, task: str = "classification"
) -> dict[str, float]:
    """The task's metrics and the test count from a (noisy, summed) histogram: accuracy
    and AUC (binary tasks) for classification, Dice and HD95 for segmentation.

    A metric with no support (no records left after clipping; one class only for AUC) is
    left out rather than reported as a number.

    Raises:
        ValueError: ``counts`` does not have the layout's length, or is not finite.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (histogram_size(num_classes, bins, task),) or not np.isfinite(c).all():
        raise ValueError("a histogram of another layout, or with non-finite counts")
    c = np.clip(c, 0.0, None)
    total = float(c.sum())
    out: dict[str, float] = {"num-examples": total}
    if total <= 0:
        return out
    if task == "segmentation":
        out |= _segmentation_metrics(c, bins, total)
    elif num_classes == 2:
        negatives, positives = c[:bins], c[bins:]
        correct = negatives[: bins // 2].sum() + positives[bins // 2 :].sum()
        out["accuracy"] = float(correct / total)
        n_neg, n_pos = float(negatives.sum()), float(positives.sum())
        if n_neg > 0 and n_pos > 0:
            below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
            pairs = float((positives * (below + 0.5 * negatives)).sum())
            out["auc"] = pairs / (n_neg * n_pos)
    else:
        grid = c.reshape(num_classes, num_classes)
        out["accuracy"] = float(np.trace(grid) / total)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Delta at ``epsilon`` of a mu-GDP mechanism (exact; Dong, Roth and Su 2019, Cor. 2.13):
    ``Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)``. ``releases`` Gaussian releases of
    sensitivity 1 and noise sigma compose exactly to mu = sqrt(releases) / sigma."""
    return _phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * _phi(-epsilon / mu - mu / 2)


def release_noise(epsilon: float, delta: float, releases: int) -> float:
    """The noise multiplier of each of ``releases`` sensitivity-1 Gaussian releases whose
    composition alone is (``epsilon``, ``delta``)-DP (bisection on mu; the result is
    rounded up to 1e-6, so it never costs more than asked). Both roles compute it the same
    way from the contract: it is how the contract's ``evaluation.epsilon_share`` becomes a
    noise level.

    Raises:
        ValueError: non-positive arguments.
    """
    if epsilon <= 0 or not 0 < delta < 1 or releases < 1:
        raise ValueError("epsilon and delta must be positive (delta < 1), releases at least 1")
    low, high = 1e-6, 1.0
    while gaussian_delta(epsilon, high) < delta:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if gaussian_delta(epsilon, mid) > delta:
            high = mid
        else:
            low = mid
    sigma = math.sqrt(releases) / low
    return math.ceil(sigma * 1e6) / 1e6
