"""File loaders: CSV, PNG folders, NIfTI and DICOM, on small files written by the tests."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from site_node.data import LocalDataset, load_csv, load_image_folder, load_volumes
from site_node.data.csv_loader import read_ranges_file, scale_to_ranges
from site_node.data.dataset import split_key, split_position
from site_node.errors import (
    DatasetConfigError,
    DatasetError,
    EmptyDatasetError,
    MissingColumnError,
    MissingFileError,
    NonNumericValueError,
    UnknownLabelError,
)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def tabular(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = [
        [f"p{i}", *np.round(rng.normal(10 * (i % 2), 2, size=3), 4), "yes" if i % 2 else "no"]
        for i in range(40)
    ]
    return _write_csv(tmp_path / "t.csv", ["record_id", "a", "b", "c", "outcome"], rows)


RANGES = {"a": (-10.0, 20.0), "b": (-10.0, 20.0), "c": (-10.0, 20.0)}


def _load(path: Path, split: str, **kw: object) -> LocalDataset:
    args: dict[str, object] = {
        "label_column": "outcome",
        "id_column": "record_id",
        "classes": ("no", "yes"),
        "feature_ranges": RANGES,
        "test_fraction": 0.25,
        "seed": 3,
    }
    args.update(kw)
    return load_csv(path, split=split, **args)  # type: ignore[arg-type]


def _ids(ds: LocalDataset, path: Path) -> set[str]:
    """Record ids of a loaded split (found by matching the scaled rows back)."""
    raw = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(1, 2, 3))
    scaled = scale_to_ranges(raw, list(RANGES.values()))
    rows = [tuple(np.round(r, 5)) for r in ds.features.numpy()]
    index = {tuple(np.round(r, 5)): f"p{i}" for i, r in enumerate(scaled)}
    return {index[r] for r in rows}


class TestCsv:
    def test_splits_are_disjoint_keyed_by_record_id_and_scaled_to_declared_ranges(
        self, tabular: Path
    ) -> None:
        train = _load(tabular, "train")
        test = _load(tabular, "test")
        assert len(train) + len(test) == 40
        assert 4 <= len(test) <= 16  # 10 expected: a hash split is exact only in expectation
        assert train.feature_names == ("a", "b", "c")
        assert train.class_names == ("no", "yes")
        assert train.features.dtype == torch.float32
        assert train.labels.dtype == torch.int64
        # Each record's split is its keyed hash, nothing else.
        key = split_key(3)
        expected_test = {f"p{i}" for i in range(40) if split_position(f"p{i}", key) < 0.25}
        assert _ids(test, tabular) == expected_test
        assert _ids(train, tabular) == {f"p{i}" for i in range(40)} - expected_test
        # Features: clipped to the declared range and mapped to [-1, 1], no statistic read.
        raw = np.loadtxt(tabular, delimiter=",", skiprows=1, usecols=(1, 2, 3))
        mapped = 2 * (np.clip(raw, -10, 20) + 10) / 30 - 1
        in_test = np.array([f"p{i}" in expected_test for i in range(40)])
        assert np.allclose(test.features.numpy(), mapped[in_test], atol=1e-6)
        assert float(train.features.min()) >= -1.0
        assert float(train.features.max()) <= 1.0

    def test_one_record_changed_or_removed_moves_no_other_record(
        self, tabular: Path, tmp_path: Path
    ) -> None:
        """The neighbouring-dataset check of preprocessing: every other record keeps its
        split and its exact input when one record is removed, or changed to an extreme."""
        with tabular.open(newline="") as fh:
            header, *rows = list(csv.reader(fh))
        before = {split: _load(tabular, split) for split in ("train", "test")}
        before_rows = {
            split: {tuple(r) for r in ds.features.numpy().round(6)} for split, ds in before.items()
        }

        def scaled(row: list[str]) -> tuple[float, ...]:
            values = np.array([[float(v) for v in row[1:4]]])
            return tuple(scale_to_ranges(values, list(RANGES.values()))[0].round(6))

        for victim in (0, 7, 23):
            changed = [r[:] for r in rows]
            changed[victim][1:4] = ["1e9", "-1e9", "5"]
            removed = [r for i, r in enumerate(rows) if i != victim]
            for variant, data in (("changed", changed), ("removed", removed)):
                path = _write_csv(tmp_path / f"{variant}{victim}.csv", header, data)
                for split in ("train", "test"):
                    after = {tuple(r) for r in _load(path, split).features.numpy().round(6)}
                    others_after = after - {scaled(changed[victim])}
                    others_before = before_rows[split] - {scaled(rows[victim])}
                    assert others_after == others_before, (variant, victim, split)

    def test_split_is_deterministic_and_keyed_by_the_seed(self, tabular: Path) -> None:
        a, b = _load(tabular, "test"), _load(tabular, "test")
        assert torch.equal(a.features, b.features)
        assert not torch.equal(a.features, _load(tabular, "test", seed=4).features)

    def test_without_an_id_column_a_record_is_keyed_by_its_own_cells(self, tabular: Path) -> None:
        train = _load(tabular, "train", id_column=None, exclude_columns=("record_id",))
        test = _load(tabular, "test", id_column=None, exclude_columns=("record_id",))
        assert len(train) + len(test) == 40
        with tabular.open(newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        key = split_key(3)
        n_test = sum(split_position("\x1f".join(r), key) < 0.25 for r in rows)
        assert len(test) == n_test

    def test_a_feature_without_a_declared_range_is_refused(self, tabular: Path) -> None:
        with pytest.raises(DatasetConfigError, match=r"no declared range.*\['c'\]") as info:
            _load(tabular, "train", feature_ranges={"a": (0.0, 1.0), "b": (0.0, 1.0)})
        assert info.value.code == "data.invalid_config"
        with pytest.raises(DatasetConfigError, match="not features"):
            _load(tabular, "train", feature_ranges={**RANGES, "outcome": (0.0, 1.0)})
        raw = _load(tabular, "train", feature_ranges=None, scaling="none")
        assert float(raw.features.abs().max()) > 1.0  # declared unscaled: left as they are

    def test_ranges_file(self, tabular: Path, tmp_path: Path) -> None:
        path = _write_csv(
            tmp_path / "ranges.csv",
            ["column", "low", "high"],
            [[c, lo, hi] for c, (lo, hi) in RANGES.items()],
        )
        from_file = _load(tabular, "train", feature_ranges=read_ranges_file(path))
        assert torch.equal(from_file.features, _load(tabular, "train").features)
        bad = _write_csv(tmp_path / "bad.csv", ["column", "low", "high"], [["a", 5, 1]])
        with pytest.raises(DatasetError, match="line 2: need finite low < high"):
            read_ranges_file(bad)
        nan = _write_csv(tmp_path / "nan.csv", ["column", "low", "high"], [["a", "x", 1]])
        with pytest.raises(DatasetError, match="must be numbers"):
            read_ranges_file(nan)
        twice = _write_csv(tmp_path / "t.csv", ["column", "low", "high"], [["a", 0, 1]] * 2)
        with pytest.raises(DatasetError, match="repeated"):
            read_ranges_file(twice)
        with pytest.raises(MissingColumnError, match="'high'"):
            read_ranges_file(_write_csv(tmp_path / "h.csv", ["column", "low"], [["a", 0]]))
        with pytest.raises(MissingFileError):
            read_ranges_file(tmp_path / "absent.csv")

    def test_repeated_or_empty_record_ids_are_refused(self, tmp_path: Path) -> None:
        rows = [["p1", 1, 2, 3, "no"], ["p2", 1, 2, 3, "yes"], ["p1", 4, 5, 6, "no"]]
        path = _write_csv(tmp_path / "d.csv", ["record_id", "a", "b", "c", "outcome"], rows)
        with pytest.raises(DatasetError, match="line 4 repeats line 2"):
            _load(path, "train")
        rows[2][0] = " "
        path = _write_csv(tmp_path / "e.csv", ["record_id", "a", "b", "c", "outcome"], rows)
        with pytest.raises(DatasetError, match="line 4 has an empty record id"):
            _load(path, "train")

    def test_an_empty_split_is_an_error_not_a_silent_nothing(self, tmp_path: Path) -> None:
        rows = [["p1", 1, 2, 3, "no"], ["p2", 1, 2, 3, "yes"]]
        path = _write_csv(tmp_path / "d.csv", ["record_id", "a", "b", "c", "outcome"], rows)
        key = split_key(3)
        assert all(split_position(f"p{i}", key) >= 0.01 for i in (1, 2))
        with pytest.raises(EmptyDatasetError, match="none of the 2 records in the test split"):
            _load(path, "test", test_fraction=0.01)

    def test_configured_classes_fix_the_order_and_are_required(self, tabular: Path) -> None:
        ds = _load(tabular, "train", classes=("yes", "no"))
        assert ds.class_names == ("yes", "no")
        assert ds.num_classes == 2
        with pytest.raises(UnknownLabelError, match="'no'"):
            _load(tabular, "train", classes=("yes", "maybe"))
        three = _load(tabular, "train", classes=("no", "yes", "unsure"))
        assert three.num_classes == 3  # a class no record holds is still the task's
        with pytest.raises(UnknownLabelError, match="at least 2 configured classes"):
            _load(tabular, "train", classes=("no",))

    def test_summary_is_metadata_only(self, tabular: Path) -> None:
        train = _load(tabular, "train")
        summary = train.summary()
        assert summary == {
            "records": len(train),
            "split": "train",
            "modality": "tabular",
            "input_shape": [3],
            "num_classes": 2,
            "task": "classification",
            "label_counts": dict(zip(("no", "yes"), train.label_counts(), strict=True)),
            "feature_names": ["a", "b", "c"],
        }

    def test_missing_label_or_id_column(self, tabular: Path) -> None:
        with pytest.raises(MissingColumnError, match="'diagnosis'") as info:
            _load(tabular, "train", label_column="diagnosis")
        assert info.value.code == "data.missing_column"
        with pytest.raises(MissingColumnError, match="id column 'mrn'"):
            _load(tabular, "train", id_column="mrn")

    def test_non_numeric_value_names_column_and_line(self, tmp_path: Path) -> None:
        rows = [[1.0, 2.0, 0], [1.5, "Smith", 1], [2.0, 3.0, 0], [2.5, 4.0, 1]]
        path = _write_csv(tmp_path / "x.csv", ["age", "weight", "label"], rows)
        with pytest.raises(NonNumericValueError) as info:
            load_csv(
                path, label_column="label", classes=("0", "1"), split="train",
                test_fraction=0.0, seed=0, scaling="none",
            )  # fmt: skip
        message = str(info.value)
        assert "'weight'" in message
        assert "line 3" in message
        assert "Smith" not in message  # never echo cell values

    def test_empty_file_and_header_only(self, tmp_path: Path) -> None:
        kw: dict[str, object] = {"classes": ("0", "1"), "split": "train", "seed": 0}
        empty = tmp_path / "empty.csv"
        empty.write_text("")
        with pytest.raises(EmptyDatasetError, match="empty"):
            load_csv(empty, label_column="label", test_fraction=0.2, **kw)  # type: ignore[arg-type]
        header = _write_csv(tmp_path / "h.csv", ["a", "label"], [])
        with pytest.raises(EmptyDatasetError, match="no data rows"):
            load_csv(header, label_column="label", test_fraction=0.2, **kw)  # type: ignore[arg-type]

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(MissingFileError):
            load_csv(
                tmp_path / "nope.csv",
                label_column="y",
                classes=("0", "1"),
                split="train",
                test_fraction=0,
                seed=0,
            )


def _png_folder(root: Path, n: int = 12) -> Path:
    root.mkdir()
    rows = []
    rng = np.random.default_rng(1)
    for i in range(n):
        label = i % 2
        pixels = rng.integers(0, 60, size=(20, 24)).astype(np.uint8)
        if label:
            pixels[5:15, 6:18] = 250
        if i % 3 == 0:  # some RGB images: converted to grayscale
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(root / f"img{i}.png")
        else:
            Image.fromarray(pixels).save(root / f"img{i}.png")
        rows.append([f"img{i}.png", "lesion" if label else "normal"])
    _write_csv(root / "labels.csv", ["filename", "label"], rows)
    return root


class TestImageFolder:
    def test_loads_grayscale_resized_scaled(self, tmp_path: Path) -> None:
        root = _png_folder(tmp_path / "imgs")
        kw = {
            "labels_file": "labels.csv",
            "image_size": 8,
            "test_fraction": 0.25,
            "seed": 0,
            "classes": ("lesion", "normal"),
        }
        train = load_image_folder(root, split="train", **kw)  # type: ignore[arg-type]
        test = load_image_folder(root, split="test", **kw)  # type: ignore[arg-type]
        key = split_key(0)
        n_test = sum(split_position(f"img{i}.png", key) < 0.25 for i in range(12))
        assert 0 < n_test < 12
        assert train.features.shape == (12 - n_test, 1, 8, 8)
        assert test.features.shape == (n_test, 1, 8, 8)
        assert train.input_shape == (1, 8, 8)
        assert train.class_names == ("lesion", "normal")
        assert float(train.features.min()) >= 0.0
        assert float(train.features.max()) <= 1.0
        # The bright square (rows 5-15, cols 6-18 of 20x24) survives loading at 8x8.
        centre = train.features[:, 0, 3:5, 3:5].mean(dim=(1, 2))
        assert bool((centre[train.labels == 0] > 0.9).all())
        assert bool((centre[train.labels == 1] < 0.9).all())
        assert train.summary()["input_shape"] == [1, 8, 8]

    def test_an_image_removed_from_the_index_moves_no_other(self, tmp_path: Path) -> None:
        root = _png_folder(tmp_path / "imgs")
        kw = {"labels_file": "labels.csv", "image_size": 8, "test_fraction": 0.5, "seed": 2}
        classes = ("lesion", "normal")
        before = load_image_folder(root, split="test", classes=classes, **kw)  # type: ignore[arg-type]
        with (root / "labels.csv").open(newline="") as fh:
            header, *rows = list(csv.reader(fh))
        _write_csv(root / "labels.csv", header, rows[1:])  # img0.png is withdrawn
        after = load_image_folder(root, split="test", classes=classes, **kw)  # type: ignore[arg-type]
        key = split_key(2)
        if split_position("img0.png", key) < 0.5:  # img0 was a test image: one fewer
            assert torch.equal(after.features, before.features[1:])
        else:
            assert torch.equal(after.features, before.features)

    def test_missing_image(self, tmp_path: Path) -> None:
        root = _png_folder(tmp_path / "imgs")
        (root / "img4.png").unlink()
        with pytest.raises(MissingFileError, match=r"img4\.png"):
            load_image_folder(
                root,
                labels_file="labels.csv",
                image_size=8,
                split="train",
                test_fraction=0.2,
                seed=0,
                classes=("lesion", "normal"),
            )

    def test_unknown_label(self, tmp_path: Path) -> None:
        root = _png_folder(tmp_path / "imgs")
        with pytest.raises(UnknownLabelError, match="'lesion'"):
            load_image_folder(
                root,
                labels_file="labels.csv",
                image_size=8,
                split="train",
                test_fraction=0.2,
                seed=0,
                classes=("normal", "tumour"),
            )

    def test_missing_labels_file_and_escape(self, tmp_path: Path) -> None:
        root = _png_folder(tmp_path / "imgs")
        kw = {
            "image_size": 8,
            "split": "train",
            "test_fraction": 0.2,
            "seed": 0,
            "classes": ("lesion", "normal", "a"),
        }
        with pytest.raises(MissingFileError, match=r"other\.csv"):
            load_image_folder(root, labels_file="other.csv", **kw)  # type: ignore[arg-type]
        _write_csv(root / "bad.csv", ["filename", "label"], [["../secret.png", "a"]])
        (tmp_path / "secret.png").write_bytes(b"x")
        with pytest.raises(DatasetError, match="outside the dataset folder"):
            load_image_folder(root, labels_file="bad.csv", **kw)  # type: ignore[arg-type]

    def test_undecodable_image(self, tmp_path: Path) -> None:
        root = _png_folder(tmp_path / "imgs", n=4)
        (root / "img1.png").write_bytes(b"not a png")
        with pytest.raises(DatasetError, match=r"img1\.png"):
            load_image_folder(
                root,
                labels_file="labels.csv",
                image_size=8,
                split="train",
                test_fraction=0,
                seed=0,
                classes=("lesion", "normal"),
            )


def _nifti_folder(root: Path) -> Path:
    root.mkdir()
    rows = []
    for i in range(6):
        volume = np.full((10, 12, 9), 1.0, dtype=np.float32)
        volume[:, :, 4] = 5.0 + i  # the central slice along the last axis is the bright one
        volume[0, 0, 4] = 0.0
        name = f"v{i}.nii.gz" if i % 2 else f"v{i}.nii"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / name))
        rows.append([name, i % 2])
    _write_csv(root / "labels.csv", ["filename", "label"], rows)
    return root


def _dicom_file(path: Path, value: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 16, 12
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    pixels = np.zeros((16, 12), dtype=np.uint16)
    pixels[4:12, 3:9] = value
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


class TestVolumes:
    def test_nifti_central_slice(self, tmp_path: Path) -> None:
        root = _nifti_folder(tmp_path / "nii")
        ds = load_volumes(
            root,
            fmt="nifti",
            labels_file="labels.csv",
            image_size=8,
            split="train",
            test_fraction=0.0,
            seed=0,
            classes=("0", "1"),
        )
        assert ds.features.shape == (6, 1, 8, 8)
        assert ds.num_classes == 2
        # The slice taken is the bright central one: mostly at the maximum after scaling.
        assert float(ds.features.mean()) > 0.9

    def test_nifti_whole_volume(self, tmp_path: Path) -> None:
        root = _nifti_folder(tmp_path / "nii")
        ds = load_volumes(
            root,
            fmt="nifti",
            labels_file="labels.csv",
            image_size=6,
            volume_mode="volume",
            split="test",
            test_fraction=0.5,
            seed=0,
            classes=("0", "1"),
        )
        key = split_key(0)
        names = [f"v{i}.nii.gz" if i % 2 else f"v{i}.nii" for i in range(6)]
        n_test = sum(split_position(n, key) < 0.5 for n in names)
        assert ds.features.shape == (n_test, 1, 6, 6, 6)
        assert ds.input_shape == (1, 6, 6, 6)

    def test_dicom_files(self, tmp_path: Path) -> None:
        root = tmp_path / "dcm"
        root.mkdir()
        rows = []
        for i in range(4):
            _dicom_file(root / f"s{i}.dcm", 1000 + i)
            rows.append([f"s{i}.dcm", "ct-pos" if i % 2 else "ct-neg"])
        _write_csv(root / "labels.csv", ["filename", "label"], rows)
        assert pydicom.dcmread(root / "s0.dcm").Modality == "CT"
        ds = load_volumes(
            root,
            fmt="dicom",
            labels_file="labels.csv",
            image_size=8,
            split="train",
            test_fraction=0.0,
            seed=0,
            modality="CT",
            classes=("ct-neg", "ct-pos"),
        )
        assert ds.features.shape == (4, 1, 8, 8)
        assert ds.modality == "CT"
        assert ds.class_names == ("ct-neg", "ct-pos")
        assert float(ds.features.max()) == pytest.approx(1.0)

    def test_not_a_dicom(self, tmp_path: Path) -> None:
        root = tmp_path / "dcm"
        root.mkdir()
        (root / "x.dcm").write_bytes(b"garbage" * 10)
        _write_csv(root / "labels.csv", ["filename", "label"], [["x.dcm", "0"], ["x.dcm", "1"]])
        with pytest.raises(DatasetError, match=r"x\.dcm"):
            load_volumes(
                root,
                fmt="dicom",
                labels_file="labels.csv",
                image_size=8,
                split="train",
                test_fraction=0.0,
                seed=0,
                classes=("0", "1"),
            )


def _dicom_series(folder: Path, *, slices: int = 6, value: int = 100, mixed: bool = False) -> None:
    """One CT series: ``slices`` axial slices 2 mm apart, 0.5 mm pixels (``mixed``: every
    other slice claims another series)."""
    folder.mkdir(parents=True)
    series_uid, other_uid = generate_uid(), generate_uid()
    for k in range(slices):
        path = folder / f"{k:03d}.dcm"
        _dicom_file(path, value + k)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = other_uid if mixed and k % 2 else series_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 2.0
        ds.save_as(str(path), enforce_file_format=True)


#: load_volumes arguments for a folder of DICOM series read as volumes.
SERIES: dict[str, Any] = {
    "fmt": "dicom",
    "labels_file": "labels.csv",
    "split": "train",
    "test_fraction": 0.0,
    "seed": 0,
    "volume_mode": "volume",
}


class TestDicomSeries:
    """The ``dicom`` kind reads a folder of series folders, one volume per series."""

    def _folder(self, root: Path, n: int = 4) -> Path:
        root.mkdir()
        rows = []
        for i in range(n):
            _dicom_series(root / f"series-{i}", value=500 * i)
            rows.append([f"series-{i}", "pos" if i % 2 else "neg"])
        _write_csv(root / "labels.csv", ["filename", "label"], rows)
        return root

    def test_each_series_folder_is_one_volume(self, tmp_path: Path) -> None:
        from site_node.data.registry import DatasetConfig, load_dataset

        root = self._folder(tmp_path / "ct")
        config = DatasetConfig(
            id="ct-series",
            kind="dicom",
            path=root,
            classes=("neg", "pos"),
            volume_mode="volume",
            image_size=8,
            test_fraction=0.0,
        )
        ds = load_dataset(config, split="train")
        assert ds.features.shape == (4, 1, 8, 8, 8)
        assert ds.labels.tolist() == [0, 1, 0, 1]

    def test_the_study_preprocessing_resamples_the_series_by_its_geometry(
        self, tmp_path: Path
    ) -> None:
        from concord_protocol.preprocessing import PreprocessingSpec
        from site_node.data.cache import RecordCache

        root = self._folder(tmp_path / "ct", n=2)
        spec = PreprocessingSpec.model_validate(
            {
                "steps": [
                    {"op": "orientation", "axcodes": "RAS"},
                    {"op": "spacing", "pixdim": [1.0, 1.0, 1.0]},
                    {"op": "scale_intensity_range", "a_min": 0, "a_max": 2000},
                ]
            }
        )
        kw = {**SERIES, "classes": ("neg", "pos")}
        # 12 x 16 pixels of 0.5 mm, 6 slices of 2 mm: 6 x 8 x 12 voxels of 1 mm. Spacing
        # does not fix the size, so image_size does (12 on every axis) after it.
        cache = RecordCache(max_bytes=2**20)
        ds = load_volumes(root, image_size=12, preprocessing=spec, cache=cache, **kw)
        assert ds.features.shape == (2, 1, 12, 12, 12)
        assert 0.0 <= float(ds.features.min()) <= float(ds.features.max()) <= 1.0
        load_volumes(root, image_size=12, preprocessing=spec, cache=cache, **kw)
        assert (cache.stats.hits, cache.stats.misses) == (2, 2)
        fixed = PreprocessingSpec.model_validate(
            {
                "steps": [
                    *spec.model_dump()["steps"],
                    {"op": "crop_or_pad", "spatial_size": [6, 8, 12]},
                ]
            }
        )
        ds = load_volumes(root, image_size=12, preprocessing=fixed, **kw)
        assert ds.features.shape == (2, 1, 6, 8, 12)

    def test_a_folder_mixing_two_series_is_refused(self, tmp_path: Path) -> None:
        root = tmp_path / "ct"
        root.mkdir()
        _dicom_series(root / "mixed", mixed=True)
        _dicom_series(root / "clean")
        _write_csv(root / "labels.csv", ["filename", "label"], [["mixed", "a"], ["clean", "b"]])
        with pytest.raises(DatasetError, match="'mixed' holds slices of 2 series") as info:
            load_volumes(root, image_size=8, classes=("a", "b"), **SERIES)
        assert info.value.code == "data.mixed_series"
