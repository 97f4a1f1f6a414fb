"""The noisy evaluation histogram a site releases: right counts underneath, fresh Gaussian
noise of the contract's level on every cell."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from concord_protocol.eval_histograms import histogram
from site_node.data.dataset import LocalDataset
from site_node.privacy.dp_metrics import noisy_histogram, probabilities


def _data(n: int = 40) -> tuple[nn.Module, LocalDataset]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = LocalDataset(
        features=torch.randn(n, 3),
        labels=torch.randint(0, 2, (n,)),
        num_classes=2,
        modality="tabular",
        split="test",
    )
    return model, data


def test_each_release_is_the_true_histogram_plus_fresh_gaussian_noise() -> None:
    model, data = _data()
    exact = histogram(data.labels.numpy(), probabilities(model, data), bins=4)
    releases = np.array(
        [noisy_histogram(model, data, bins=4, noise=3.0).counts for _ in range(4000)]
    )
    assert releases.shape == (4000, 8)
    noise = releases - exact
    assert np.allclose(noise.mean(axis=0), 0.0, atol=0.25)
    assert np.allclose(noise.std(axis=0), 3.0, rtol=0.06)
    assert len({tuple(r) for r in releases}) == 4000  # never the same noise twice
    # Cells are independent: no correlation between the noise of two cells.
    assert abs(np.corrcoef(noise[:, 0], noise[:, 5])[0, 1]) < 0.06


def test_an_empty_test_split_still_releases_only_noise() -> None:
    model, data = _data(0)
    released = noisy_histogram(model, data, bins=2, noise=1.0)
    assert len(released.counts) == 4
    assert released.num_classes == 2
