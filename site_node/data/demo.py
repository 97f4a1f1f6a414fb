"""Demo data for three (or more) simulated hospitals, with a global held-out test set.

Two tasks, same interface: ``*_site(site_index, n_sites, seed) -> (train, test)`` gives one
site's local data, ``*_holdout(...)`` the consortium's held-out test set, disjoint from every
site's records.

**Breast cancer (tabular).** scikit-learn's ``load_breast_cancer`` (Wisconsin Diagnostic
Breast Cancer: 569 real patients, 30 features, malignant vs benign). 20 % is first set aside,
stratified, as the global holdout. The rest is partitioned *non-IID by label*: for each class,
site shares are drawn from a Dirichlet(``alpha``) distribution (default ``alpha = 1.0``) and
that class's shuffled records are cut accordingly, so sites differ in how many malignant cases
they see (as referral centres do). Draws are repeated (deterministically) until every site has
at least ``MIN_SITE_RECORDS`` records and 4 of each class. Each site then splits its records
80/20 into train/test (stratified).

Standardisation uses the mean and standard deviation of the *pooled site training splits*:
the consortium-agreed constants a federation would compute with a secure sum of per-site
sums and sums of squares. The holdout and the sites' test splits never contribute.

**Synthetic images.** MONAI ``create_test_image_2d`` images (noise plus bright discs), label 0
= one disc, label 1 = four discs: learnable from total bright area, under DP too. Site
``i`` draws label 1 with probability ``(i + 1) / (n_sites + 1)`` (label skew). Sites and the
holdout use independent random streams (``SeedSequence([seed, stream])``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch
from monai.data import create_test_image_2d
from sklearn.datasets import load_breast_cancer

from site_node.data.dataset import LocalDataset, Split, split_indices
from site_node.errors import DatasetConfigError

__all__ = [
    "BREAST_CANCER_CLASSES",
    "MIN_SITE_RECORDS",
    "SYNTHETIC_IMAGE_CLASSES",
    "breast_cancer_holdout",
    "breast_cancer_site",
    "synthetic_images_holdout",
    "synthetic_images_site",
]

BREAST_CANCER_CLASSES = ("malignant", "benign")
SYNTHETIC_IMAGE_CLASSES = ("one_disc", "four_discs")
MIN_SITE_RECORDS = 90
HOLDOUT_FRACTION = 0.2
SITE_TEST_FRACTION = 0.2
_MAX_SITES = 8
_HOLDOUT_STREAM = 1_000_003


def _check_site(site_index: int, n_sites: int) -> None:
    if not 1 <= n_sites <= _MAX_SITES:
        raise DatasetConfigError(f"n_sites must be in [1, {_MAX_SITES}], got {n_sites}")
    if not 0 <= site_index < n_sites:
        raise DatasetConfigError(f"site_index must be in [0, {n_sites}), got {site_index}")


@lru_cache(maxsize=16)
def _breast_cancer_partition(
    n_sites: int, seed: int, alpha: float
) -> tuple[np.ndarray, tuple[tuple[np.ndarray, np.ndarray], ...], np.ndarray, np.ndarray]:
    """(holdout indices, per-site (train, test) indices, mean, std) into the full data."""
    x, y = load_breast_cancer(return_X_y=True)
    pool, holdout = split_indices(y, test_fraction=HOLDOUT_FRACTION, seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n_sites]))
    for _attempt in range(10_000):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for cls in np.unique(y[pool]):
            members = rng.permutation(pool[y[pool] == cls])
            shares = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(int(i) for i in chunk)
        ok = all(
            len(p) >= MIN_SITE_RECORDS and np.bincount(y[p], minlength=2).min() >= 4 for p in parts
        )
        if ok:
            break
    else:  # pragma: no cover - 10,000 unlucky draws
        raise DatasetConfigError(f"cannot partition the data into {n_sites} usable sites")
    sites = []
    for part in parts:
        members = np.sort(np.array(part, dtype=np.int64))
        tr, te = split_indices(y[members], test_fraction=SITE_TEST_FRACTION, seed=seed)
        sites.append((members[tr], members[te]))
    pooled_train = np.concatenate([tr for tr, _ in sites])
    if np.intersect1d(pooled_train, holdout).size:  # pragma: no cover - by construction
        raise DatasetConfigError("site data overlaps the holdout")
    mean = x[pooled_train].mean(axis=0)
    std = x[pooled_train].std(axis=0)
    return holdout, tuple(sites), mean, std


def _breast_cancer_subset(idx: np.ndarray, mean: np.ndarray, std: np.ndarray) -> LocalDataset:
    data = load_breast_cancer()
    x = ((data.data[idx] - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    return LocalDataset(
        features=torch.from_numpy(x),
        labels=torch.from_numpy(data.target[idx].astype(np.int64)),
        num_classes=2,
        modality="tabular",
        feature_names=tuple(str(n) for n in data.feature_names),
        class_names=BREAST_CANCER_CLASSES,
    )


def breast_cancer_site(
    site_index: int, n_sites: int = 3, seed: int = 7, *, alpha: float = 1.0
) -> tuple[LocalDataset, LocalDataset]:
    """One site's (train, test) split of the breast-cancer data (see the module docstring)."""
    _check_site(site_index, n_sites)
    _, sites, mean, std = _breast_cancer_partition(n_sites, seed, alpha)
    tr, te = sites[site_index]
    train = _breast_cancer_subset(tr, mean, std)
    return train, _as_split(_breast_cancer_subset(te, mean, std), "test")


def breast_cancer_holdout(seed: int = 7, n_sites: int = 3, *, alpha: float = 1.0) -> LocalDataset:
    """The global held-out test set, disjoint from all sites, standardised like the sites."""
    holdout, _, mean, std = _breast_cancer_partition(n_sites, seed, alpha)
    return _as_split(_breast_cancer_subset(holdout, mean, std), "test")


def _as_split(ds: LocalDataset, split: Split) -> LocalDataset:
    return replace(ds, split=split)


def _synthetic_images(
    n: int, *, p_positive: float, image_size: int, stream: int, seed: int
) -> LocalDataset:
    if image_size < 16:
        raise DatasetConfigError(f"image_size must be >= 16 for synthetic images, got {image_size}")
    rng = np.random.RandomState(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    rad_max = max(4, image_size // 5)
    rad_min = max(2, image_size // 10)
    labels = (rng.random_sample(n) < p_positive).astype(np.int64)
    images = np.empty((n, 1, image_size, image_size), dtype=np.float32)
    for i, label in enumerate(labels):
        image, _ = create_test_image_2d(
            image_size,
            image_size,
            num_objs=4 if label else 1,
            rad_max=rad_max,
            rad_min=rad_min,
            noise_max=0.25,
            num_seg_classes=1,
            random_state=rng,
        )
        images[i, 0] = image
    return LocalDataset(
        features=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        num_classes=2,
        modality="image",
        class_names=SYNTHETIC_IMAGE_CLASSES,
    )


def synthetic_images_site(
    site_index: int,
    n_sites: int = 3,
    seed: int = 7,
    *,
    n_samples: int = 256,
    image_size: int = 32,
) -> tuple[LocalDataset, LocalDataset]:
    """One site's (train, test) synthetic images, label-skewed by site index."""
    _check_site(site_index, n_sites)
    if n_samples < 10:
        raise DatasetConfigError(f"n_samples must be >= 10, got {n_samples}")
    full = _synthetic_images(
        n_samples,
        p_positive=(site_index + 1) / (n_sites + 1),
        image_size=image_size,
        stream=site_index,
        seed=seed,
    )
    tr, te = split_indices(full.labels.numpy(), test_fraction=SITE_TEST_FRACTION, seed=seed)
    return _subset(full, tr, "train"), _subset(full, te, "test")


def synthetic_images_holdout(
    seed: int = 7, *, n_samples: int = 256, image_size: int = 32
) -> LocalDataset:
    """A balanced held-out set of synthetic images from a stream no site uses."""
    full = _synthetic_images(
        n_samples, p_positive=0.5, image_size=image_size, stream=_HOLDOUT_STREAM, seed=seed
    )
    return _subset(full, np.arange(n_samples), "test")


def _subset(ds: LocalDataset, idx: np.ndarray, split: Split) -> LocalDataset:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return _as_split(
        LocalDataset(
            features=ds.features[t].contiguous(),
            labels=ds.labels[t].contiguous(),
            num_classes=ds.num_classes,
            modality=ds.modality,
            class_names=ds.class_names,
        ),
        split,
    )
