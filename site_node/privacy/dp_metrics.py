"""The one thing a site releases about its test split: a noisy histogram (Gaussian mechanism).

After a round, the site scores the verified aggregate on its test split and bins the
predictions into the histogram of :mod:`concord_protocol.eval_histograms` (each record in one
cell: L2 sensitivity 1 under adding or removing a record), then adds independent Gaussian
noise (standard deviation ``StudyContract.evaluation_noise()``) to every cell. That is the
Gaussian mechanism with that noise multiplier; :class:`~site_node.privacy.dp.DpTrainer`
charged it to the study's accountant when the round was trained, so the release is inside
the study's (epsilon, delta). Nothing else about the test split leaves: no loss, no exact
count, no per-record score.

The noise comes from NumPy's PCG64 seeded with 128 bits from the operating system's CSPRNG
(:mod:`secrets`), fresh for every release, so the noise cannot be predicted or replayed; the
sampler is NumPy's floating-point Gaussian, not a discrete one (the floating-point attacks on
noise samplers are named, with their status, in ``docs/privacy.md``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from concord_protocol.eval_histograms import histogram, segmentation_histogram
from site_node.data.dataset import LocalDataset
from site_node.training.loops import score
from site_node.training.segmentation import per_record_scores

__all__ = ["ReleasedHistogram", "noisy_histogram", "probabilities"]


@dataclass(frozen=True)
class ReleasedHistogram:
    """What leaves the site: the noisy counts and the layout they follow."""

    counts: list[float]
    num_classes: int


def probabilities(
    model: nn.Module, dataset: LocalDataset, *, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Class probabilities of ``model`` for every record of ``dataset`` (N, K), scored on
    ``device``."""
    return torch.softmax(score(model, dataset, device=device), dim=1).double().numpy()


def noisy_histogram(
    model: nn.Module,
    dataset: LocalDataset,
    *,
    bins: int,
    noise: float,
    device: torch.device | str = "cpu",
) -> ReleasedHistogram:
    """Score ``dataset`` with ``model`` (on ``device``) and release its histogram (``bins``
    score bins for a binary task, Dice bins for segmentation) with Gaussian noise of
    standard deviation ``noise`` on every cell."""
    counts: np.ndarray
    if dataset.task == "segmentation":
        dice, hd95 = (
            per_record_scores(
                score(model, dataset, device=device), dataset.labels, dataset.num_classes
            )
            if len(dataset)
            else (np.zeros(0), np.zeros(0))
        )
        counts = segmentation_histogram(dice, hd95, bins=bins)
    else:
        probs = (
            probabilities(model, dataset, device=device)
            if len(dataset)
            else np.zeros((0, dataset.num_classes), dtype=np.float64)
        )
        counts = histogram(dataset.labels.numpy(), probs, bins=bins)
    rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    noisy = counts + rng.normal(0.0, noise, size=counts.shape)
    return ReleasedHistogram([float(v) for v in noisy], dataset.num_classes)
