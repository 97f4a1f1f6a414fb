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
from site_node.data.csv_loader import scale_to_ranges
from site_node.data.dataset import split_key, split_position
from site_node.data.reference import WDBC_FEATURE_RANGES, write_ranges_file
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

    def test_features_are_scaled_with_the_published_ranges_not_site_statistics(self) -> None:
        """Every site's and the holdout's features are the published WDBC ranges applied to
        each record alone: a record's input is the same whichever site holds it."""
        data = load_breast_cancer()
        names = [str(n) for n in data.feature_names]
        expected = scale_to_ranges(data.data, [WDBC_FEATURE_RANGES[n] for n in names])
        rows = {tuple(np.round(r, 5)) for r in expected}
        for i in range(3):
            for part in breast_cancer_site(i, seed=7):
                assert _rows(part) <= {tuple(np.round(r, 4)) for r in expected}
                assert float(part.features.min()) >= -1.0
                assert float(part.features.max()) <= 1.0
        assert len(rows) == len(data.target)
        # The published ranges hold every published case (nothing is clipped).
        assert float(np.abs(expected).max()) <= 1.0 + 1e-6

    def test_each_site_splits_its_records_by_keyed_hash_of_the_record_id(self) -> None:
        key = split_key(7)
        for i in range(3):
            train, test = breast_cancer_site(i, seed=7)
            assert min(test.label_counts()) >= 4  # both classes in every site's test split
            n = len(train) + len(test)
            assert 0.05 < len(test) / n < 0.4
        data = load_breast_cancer()
        x = scale_to_ranges(
            data.data, [WDBC_FEATURE_RANGES[str(n)] for n in data.feature_names]
        ).round(4)
        index = {tuple(r): row for row, r in enumerate(x)}
        for i in range(3):
            train, test = breast_cancer_site(i, seed=7)
            for part, in_test in ((train, False), (test, True)):
                for r in _rows(part):
                    position = split_position(f"wdbc-{index[r]}", key)
                    assert (position < 0.2) == in_test

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
            DatasetConfig(id="x", kind="csv", classes=("a", "b"))
        with pytest.raises(pydantic.ValidationError, match="needs `classes`"):
            DatasetConfig(id="x", kind="csv", path=tmp_path)
        with pytest.raises(pydantic.ValidationError, match="site_index"):
            DatasetConfig(id="x", kind="demo_breast_cancer")
        with pytest.raises(pydantic.ValidationError, match="takes no `path`"):
            DatasetConfig(id="x", kind="demo_breast_cancer", site_index=0, path=tmp_path)
        with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
            DatasetConfig(id="x", kind="csv", path=tmp_path, colour="blue")  # type: ignore[call-arg]
        with pytest.raises(pydantic.ValidationError):
            DatasetConfig(id="Not A Slug", kind="csv", path=tmp_path, classes=("a", "b"))
        csv_kw: dict[str, object] = {"id": "x", "kind": "csv", "path": tmp_path}
        csv_kw["classes"] = ("a", "b")
        with pytest.raises(pydantic.ValidationError, match="finite low < high"):
            DatasetConfig(**csv_kw, feature_ranges={"age": (90.0, 0.0)})  # type: ignore[arg-type]
        with pytest.raises(pydantic.ValidationError, match="finite low < high"):
            DatasetConfig(**csv_kw, feature_ranges={"age": (0.0, float("inf"))})  # type: ignore[arg-type]
        with pytest.raises(pydantic.ValidationError, match="not both"):
            DatasetConfig(
                **csv_kw,  # type: ignore[arg-type]
                feature_ranges={"age": (0.0, 1.0)},
                feature_ranges_file=tmp_path / "r.csv",
            )
        with pytest.raises(pydantic.ValidationError, match="for CSV datasets"):
            DatasetConfig(
                id="x", kind="image_folder", path=tmp_path, classes=("a", "b"), id_column="mrn"
            )

    def test_load_csv_via_config_with_a_ranges_file(self, tmp_path: Path) -> None:
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["mrn", "x", "y", "dx"])
            writer.writerows([[f"m{i}", i, i * 2 % 7, i % 2] for i in range(40)])
        ranges = write_ranges_file(tmp_path / "ranges.csv", {"x": (0.0, 39.0), "y": (0.0, 6.0)})
        config = DatasetConfig(
            id="ward-7",
            kind="csv",
            path=path,
            label_column="dx",
            id_column="mrn",
            classes=("0", "1"),
            feature_ranges_file=ranges,
            seed=1,
        )
        train = load_dataset(config, split="train")
        test = load_dataset(config, split="test")
        key = split_key(1)
        assert len(test) == sum(split_position(f"m{i}", key) < 0.2 for i in range(40))
        assert len(train) + len(test) == 40
        assert train.feature_names == ("x", "y")
        assert float(train.features.min()) >= -1.0
        assert float(train.features.max()) <= 1.0
        assert train.dataset_id == "ward-7"
        assert train.summary()["dataset_id"] == "ward-7"
        no_ranges = config.model_copy(update={"feature_ranges_file": None})
        with pytest.raises(DatasetConfigError, match="no declared range"):
            load_dataset(no_ranges, split="train")

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
