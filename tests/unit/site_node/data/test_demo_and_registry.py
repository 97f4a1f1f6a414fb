"""Demo data (non-IID sites, disjoint holdout) and the dataset registry."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score

from site_node.data import (
    DatasetConfig,
    breast_cancer_holdout,
    breast_cancer_site,
    load_dataset,
    synthetic_images_holdout,
    synthetic_images_site,
)
from site_node.errors import DatasetConfigError


def _rows(ds: object) -> set[tuple[float, ...]]:
    return {tuple(np.round(r, 4)) for r in ds.features.reshape(len(ds), -1).numpy()}  # type: ignore[attr-defined]


class TestBreastCancer:
    def test_sites_are_label_skewed_and_cover_the_pool(self) -> None:
        sites = [breast_cancer_site(i, 3, seed=7) for i in range(3)]
        holdout = breast_cancer_holdout(seed=7, n_sites=3)
        malignant_share = []
        total = len(holdout)
        for train, test in sites:
            assert len(train) >= 60
            assert train.num_classes == 2
            assert train.class_names == ("malignant", "benign")
            assert train.feature_names is not None
            assert len(train.feature_names) == 30
            counts = train.label_counts()
            malignant_share.append(counts[0] / sum(counts))
            total += len(train) + len(test)
        assert total == len(load_breast_cancer().target)  # every record used exactly once
        assert max(malignant_share) - min(malignant_share) > 0.25  # non-IID by label

    def test_holdout_is_disjoint_from_every_site(self) -> None:
        holdout = _rows(breast_cancer_holdout(seed=7))
        assert len(holdout) == 114
        seen: set[tuple[float, ...]] = set()
        for i in range(3):
            train, test = breast_cancer_site(i, seed=7)
            rows = _rows(train) | _rows(test)
            assert not rows & holdout
            assert not rows & seen
            seen |= rows

    def test_standardisation_uses_pooled_site_training_data_only(self) -> None:
        trains = [breast_cancer_site(i, seed=7)[0] for i in range(3)]
        pooled = torch.cat([t.features for t in trains]).double()
        assert torch.allclose(pooled.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(pooled.std(0, unbiased=False), torch.ones(30).double(), atol=1e-4)
        holdout = breast_cancer_holdout(seed=7).features.double()
        assert float(holdout.mean(0).abs().max()) > 1e-3  # not re-centred on itself

    def test_deterministic_and_seed_dependent(self) -> None:
        a, _ = breast_cancer_site(1, seed=7)
        b, _ = breast_cancer_site(1, seed=7)
        c, _ = breast_cancer_site(1, seed=8)
        assert torch.equal(a.features, b.features)
        assert len(a) != len(c) or not torch.equal(a.features, c.features)

    def test_bad_site_index(self) -> None:
        with pytest.raises(DatasetConfigError):
            breast_cancer_site(3, 3)


class TestSyntheticImages:
    def test_shapes_and_label_skew(self) -> None:
        shares = []
        for i in range(3):
            train, test = synthetic_images_site(i, 3, seed=1, n_samples=60, image_size=16)
            assert train.features.shape[1:] == (1, 16, 16)
            assert len(train) + len(test) == 60
            shares.append(float(train.labels.float().mean()))
        assert shares[0] < shares[2]

    def test_task_is_learnable_from_bright_area(self) -> None:
        train, _ = synthetic_images_site(1, 3, seed=1, n_samples=80, image_size=16)
        # Mean intensity alone (more disc area) already separates the classes well.
        intensity = train.features.mean(dim=(1, 2, 3)).numpy()
        assert roc_auc_score(train.labels.numpy(), intensity) > 0.85

    def test_holdout_is_disjoint(self) -> None:
        holdout = synthetic_images_holdout(seed=1, n_samples=40, image_size=16)
        train, test = synthetic_images_site(0, 3, seed=1, n_samples=40, image_size=16)
        assert not _rows(holdout) & (_rows(train) | _rows(test))


class TestRegistry:
    def test_config_validation(self, tmp_path: Path) -> None:
        with pytest.raises(pydantic.ValidationError, match="needs `path`"):
            DatasetConfig(id="x", kind="csv")
        with pytest.raises(pydantic.ValidationError, match="site_index"):
            DatasetConfig(id="x", kind="demo_breast_cancer")
        with pytest.raises(pydantic.ValidationError, match="takes no `path`"):
            DatasetConfig(id="x", kind="demo_breast_cancer", site_index=0, path=tmp_path)
        with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
            DatasetConfig(id="x", kind="csv", path=tmp_path, colour="blue")  # type: ignore[call-arg]
        with pytest.raises(pydantic.ValidationError):
            DatasetConfig(id="Not A Slug", kind="csv", path=tmp_path)

    def test_load_csv_via_config(self, tmp_path: Path) -> None:
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["x", "y", "dx"])
            writer.writerows([[i, i * 2 % 7, i % 2] for i in range(20)])
        config = DatasetConfig(id="ward-7", kind="csv", path=path, label_column="dx", seed=1)
        train = load_dataset(config, split="train")
        test = load_dataset(config, split="test")
        assert (len(train), len(test)) == (16, 4)
        assert train.dataset_id == "ward-7"
        assert train.summary()["dataset_id"] == "ward-7"

    def test_demo_kinds(self) -> None:
        config = DatasetConfig(id="bc-site-0", kind="demo_breast_cancer", site_index=0)
        train = load_dataset(config, split="train")
        expected, _ = breast_cancer_site(0, 3, 7)
        assert torch.equal(train.features, expected.features)
        images = DatasetConfig(
            id="img", kind="demo_synthetic_images", site_index=2, image_size=16, n_samples=30
        )
        test = load_dataset(images, split="test")
        assert test.input_shape == (1, 16, 16)
        assert test.split == "test"
