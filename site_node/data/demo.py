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
at least ``MIN_SITE_RECORDS`` records and 4 of each class. (This partition builds the
simulated world: it stands for which patients went to which hospital, not for anything a site
computes.) Each site then assigns its records to train or test by a keyed hash of the
record's id (``wdbc-<row>``), as every loader does
(:func:`~site_node.data.dataset.assign_split`).

Features are scaled with the **declared ranges** of the WDBC data set's published
description (:data:`~site_node.data.reference.WDBC_FEATURE_RANGES`), clipped and mapped to
``[-1, 1]``, like a CSV dataset: no statistic of any site's records (pooled or local) enters
preprocessing.

**Synthetic images.** MONAI ``create_test_image_2d`` images (noise plus bright discs), label 0
= one disc, label 1 = four discs: learnable from total bright area, under DP too. Site
``i`` draws label 1 with probability ``(i + 1) / (n_sites + 1)`` (label skew). Sites and the
holdout use independent random streams (``SeedSequence([seed, stream])``); a site's records
are split by a keyed hash of their id (``img-<site>-<i>``).

**Synthetic volumes (segmentation).** MONAI ``create_test_image_3d`` volumes: noise plus
one to four bright spheres, each voxel labelled background (0) or sphere (1). Sites differ
in noise (site ``i``'s maximum noise is ``0.2 + 0.1 * i``: scanners differ); records are
split by a keyed hash of their id (``vol-<site>-<i>``); the holdout uses its own stream.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch
from monai.data import create_test_image_2d, create_test_image_3d
from sklearn.datasets import load_breast_cancer

from site_node.data.csv_loader import scale_to_ranges
from site_node.data.dataset import LocalDataset, Split, assign_split
from site_node.data.reference import WDBC_FEATURE_RANGES
from site_node.errors import DatasetConfigError

__all__ = [
    "BREAST_CANCER_CLASSES",
    "MIN_SITE_RECORDS",
    "SYNTHETIC_IMAGE_CLASSES",
    "SYNTHETIC_VOLUME_CLASSES",
    "breast_cancer_holdout",
    "breast_cancer_site",
    "synthetic_images_holdout",
    "synthetic_images_site",
    "synthetic_volumes_holdout",
    "synthetic_volumes_site",
]

BREAST_CANCER_CLASSES = ("malignant", "benign")
SYNTHETIC_IMAGE_CLASSES = ("one_disc", "four_discs")
SYNTHETIC_VOLUME_CLASSES = ("background", "sphere")
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
) -> tuple[np.ndarray, tuple[tuple[np.ndarray, np.ndarray], ...]]:
    """(holdout indices, per-site (train, test) indices) into the full data."""
    _, y = load_breast_cancer(return_X_y=True)
    pool, holdout = _holdout_split(y, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n_sites]))
    for _attempt in range(10_000):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for cls in np.unique(y[pool]):
            members = rng.permutation(pool[y[pool] == cls])
            shares = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(int(i) for i in chunk)
        ok = all(_usable_site(np.sort(np.array(p, dtype=np.int64)), y, seed) for p in parts)
        if ok:
            break
    else:  # pragma: no cover - 10,000 unlucky draws
        raise DatasetConfigError(f"cannot partition the data into {n_sites} usable sites")
    sites = []
    for part in parts:
        members = np.sort(np.array(part, dtype=np.int64))
        tr, te = _site_split(members, seed)
        sites.append((members[tr], members[te]))
    pooled_train = np.concatenate([tr for tr, _ in sites])
    if np.intersect1d(pooled_train, holdout).size:  # pragma: no cover - by construction
        raise DatasetConfigError("site data overlaps the holdout")
    return holdout, tuple(sites)


def _holdout_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The consortium's stratified holdout (part of building the simulated world)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    pool, holdout = train_test_split(idx, test_size=HOLDOUT_FRACTION, random_state=seed, stratify=y)
    return np.sort(pool), np.sort(holdout)


def _site_split(members: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A site's train/test positions within ``members``: keyed hash of each record id."""
    ids = [f"wdbc-{int(i)}" for i in members]
    return assign_split(ids, test_fraction=SITE_TEST_FRACTION, seed=seed)


def _usable_site(members: np.ndarray, y: np.ndarray, seed: int) -> bool:
    """Enough records, and every class in both of the site's splits."""
    if len(members) < MIN_SITE_RECORDS:
        return False
    tr, te = _site_split(members, seed)
    return all(np.bincount(y[members[part]], minlength=2).min() >= 4 for part in (tr, te))


def _breast_cancer_subset(idx: np.ndarray) -> LocalDataset:
    data = load_breast_cancer()
    names = [str(n) for n in data.feature_names]
    x = scale_to_ranges(data.data[idx], [WDBC_FEATURE_RANGES[n] for n in names])
    return LocalDataset(
        features=torch.from_numpy(x),
        labels=torch.from_numpy(data.target[idx].astype(np.int64)),
        num_classes=2,
        modality="tabular",
        feature_names=tuple(names),
        class_names=BREAST_CANCER_CLASSES,
    )


def breast_cancer_site(
    site_index: int, n_sites: int = 3, seed: int = 7, *, alpha: float = 1.0
) -> tuple[LocalDataset, LocalDataset]:
    """One site's (train, test) split of the breast-cancer data (see the module docstring)."""
    _check_site(site_index, n_sites)
    _, sites = _breast_cancer_partition(n_sites, seed, alpha)
    tr, te = sites[site_index]
    return _breast_cancer_subset(tr), _as_split(_breast_cancer_subset(te), "test")


def breast_cancer_holdout(seed: int = 7, n_sites: int = 3, *, alpha: float = 1.0) -> LocalDataset:
    """The global held-out test set, disjoint from all sites, scaled like the sites."""
    holdout, _ = _breast_cancer_partition(n_sites, seed, alpha)
    return _as_split(_breast_cancer_subset(holdout), "test")


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
    return _train_test(full, f"img-{site_index}", seed)


def synthetic_images_holdout(
    seed: int = 7, *, n_samples: int = 256, image_size: int = 32
) -> LocalDataset:
    """A balanced held-out set of synthetic images from a stream no site uses."""
    full = _synthetic_images(
        n_samples, p_positive=0.5, image_size=image_size, stream=_HOLDOUT_STREAM, seed=seed
    )
    return _subset(full, np.arange(n_samples), "test")


def _train_test(full: LocalDataset, prefix: str, seed: int) -> tuple[LocalDataset, LocalDataset]:
    """A site's records split by a keyed hash of their ids (``<prefix>-<i>``)."""
    ids = [f"{prefix}-{i}" for i in range(len(full))]
    tr, te = assign_split(ids, test_fraction=SITE_TEST_FRACTION, seed=seed)
    return _subset(full, tr, "train"), _subset(full, te, "test")


def _subset(ds: LocalDataset, idx: np.ndarray, split: Split) -> LocalDataset:
    t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return _as_split(
        LocalDataset(
            features=ds.features[t].contiguous(),
            labels=ds.labels[t].contiguous(),
            num_classes=ds.num_classes,
            modality=ds.modality,
            class_names=ds.class_names,
            task=ds.task,
        ),
        split,
    )


def _synthetic_volumes(
    n: int, *, noise_max: float, size: int, stream: int, seed: int
) -> LocalDataset:
    if not 16 <= size <= 128 or size % 8:
        raise DatasetConfigError(
            f"image_size must be a multiple of 8 in [16, 128] for synthetic volumes, got {size}"
        )
    rng = np.random.RandomState(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    images = np.empty((n, 1, size, size, size), dtype=np.float32)
    masks = np.empty((n, size, size, size), dtype=np.int64)
    for i in range(n):
        image, mask = create_test_image_3d(
            size,
            size,
            size,
            num_objs=int(rng.randint(1, 5)),
            rad_max=max(3, size // 5),
            rad_min=max(2, size // 10),
            noise_max=noise_max,
            num_seg_classes=1,
            random_state=rng,
        )
        images[i, 0] = image
        masks[i] = (mask > 0).astype(np.int64)
    return LocalDataset(
        features=torch.from_numpy(images),
        labels=torch.from_numpy(masks),
        num_classes=2,
        modality="MR",
        class_names=SYNTHETIC_VOLUME_CLASSES,
        task="segmentation",
    )


def synthetic_volumes_site(
    site_index: int,
    n_sites: int = 3,
    seed: int = 7,
    *,
    n_samples: int = 24,
    image_size: int = 32,
) -> tuple[LocalDataset, LocalDataset]:
    """One site's (train, test) synthetic volumes with sphere masks (see the module
    docstring): noisier at higher site indices."""
    _check_site(site_index, n_sites)
    if n_samples < 10:
        raise DatasetConfigError(f"n_samples must be >= 10, got {n_samples}")
    full = _synthetic_volumes(
        n_samples,
        noise_max=0.2 + 0.1 * site_index,
        size=image_size,
        stream=site_index,
        seed=seed,
    )
    return _train_test(full, f"vol-{site_index}", seed)


def synthetic_volumes_holdout(
    seed: int = 7, *, n_samples: int = 24, image_size: int = 32
) -> LocalDataset:
    """Held-out synthetic volumes from a stream no site uses, at a middle noise level."""
    full = _synthetic_volumes(
        n_samples, noise_max=0.3, size=image_size, stream=_HOLDOUT_STREAM, seed=seed
    )
    return _subset(full, np.arange(n_samples), "test")
