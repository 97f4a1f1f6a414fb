"""File loaders: CSV, PNG folders, NIfTI and DICOM, on small files written by the tests."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from site_node.data import LocalDataset, load_csv, load_image_folder, load_volumes, split_indices
from site_node.errors import (
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


def _load(path: Path, split: str, **kw: object) -> LocalDataset:
    args: dict[str, object] = {
        "label_column": "outcome",
        "exclude_columns": ("record_id",),
        "test_fraction": 0.25,
        "seed": 3,
    }
    args.update(kw)
    return load_csv(path, split=split, **args)  # type: ignore[arg-type]


class TestCsv:
    def test_splits_are_disjoint_stratified_and_standardised_on_train(self, tabular: Path) -> None:
        train = _load(tabular, "train")
        test = _load(tabular, "test")
        assert len(train) == 30
        assert len(test) == 10
        assert train.feature_names == ("a", "b", "c")
        assert train.class_names == ("no", "yes")
        assert train.label_counts() == [15, 15]
        assert test.label_counts() == [5, 5]
        assert train.features.dtype == torch.float32
        assert train.labels.dtype == torch.int64
        # train is standardised with its own statistics ...
        assert torch.allclose(train.features.mean(0), torch.zeros(3), atol=1e-5)
        assert torch.allclose(train.features.std(0, unbiased=False), torch.ones(3), atol=1e-5)
        # ... and test with the train statistics, not its own.
        raw = np.loadtxt(tabular, delimiter=",", skiprows=1, usecols=(1, 2, 3))
        labels = np.array([i % 2 for i in range(40)])
        train_idx, test_idx = split_indices(labels, test_fraction=0.25, seed=3)
        mean, std = raw[train_idx].mean(0), raw[train_idx].std(0)
        expected = (raw[test_idx] - mean) / std
        assert np.allclose(test.features.numpy(), expected, atol=1e-5)
        assert not np.allclose(test.features.numpy().mean(0), 0.0, atol=1e-3)

    def test_split_is_deterministic(self, tabular: Path) -> None:
        a, b = _load(tabular, "test"), _load(tabular, "test")
        assert torch.equal(a.features, b.features)
        assert not torch.equal(a.features, _load(tabular, "test", seed=4).features)

    def test_configured_classes_fix_the_order(self, tabular: Path) -> None:
        ds = _load(tabular, "train", classes=("yes", "no"))
        assert ds.class_names == ("yes", "no")
        with pytest.raises(UnknownLabelError, match="'no'"):
            _load(tabular, "train", classes=("yes", "maybe"))

    def test_summary_is_metadata_only(self, tabular: Path) -> None:
        summary = _load(tabular, "train").summary()
        assert summary == {
            "records": 30,
            "split": "train",
            "modality": "tabular",
            "input_shape": [3],
            "num_classes": 2,
            "label_counts": {"no": 15, "yes": 15},
            "feature_names": ["a", "b", "c"],
        }

    def test_missing_label_column(self, tabular: Path) -> None:
        with pytest.raises(MissingColumnError, match="'diagnosis'") as info:
            _load(tabular, "train", label_column="diagnosis")
        assert info.value.code == "data.missing_column"

    def test_non_numeric_value_names_column_and_line(self, tmp_path: Path) -> None:
        rows = [[1.0, 2.0, 0], [1.5, "Smith", 1], [2.0, 3.0, 0], [2.5, 4.0, 1]]
        path = _write_csv(tmp_path / "x.csv", ["age", "weight", "label"], rows)
        with pytest.raises(NonNumericValueError) as info:
            load_csv(path, label_column="label", split="train", test_fraction=0.0, seed=0)
        message = str(info.value)
        assert "'weight'" in message
        assert "line 3" in message
        assert "Smith" not in message  # never echo cell values

    def test_empty_file_and_header_only(self, tmp_path: Path) -> None:
        empty = tmp_path / "empty.csv"
        empty.write_text("")
        with pytest.raises(EmptyDatasetError, match="empty"):
            load_csv(empty, label_column="label", split="train", test_fraction=0.2, seed=0)
        header = _write_csv(tmp_path / "h.csv", ["a", "label"], [])
        with pytest.raises(EmptyDatasetError, match="no data rows"):
            load_csv(header, label_column="label", split="train", test_fraction=0.2, seed=0)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(MissingFileError):
            load_csv(
                tmp_path / "nope.csv", label_column="y", split="train", test_fraction=0, seed=0
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
        kw = {"labels_file": "labels.csv", "image_size": 8, "test_fraction": 0.25, "seed": 0}
        train = load_image_folder(root, split="train", **kw)  # type: ignore[arg-type]
        test = load_image_folder(root, split="test", **kw)  # type: ignore[arg-type]
        assert train.features.shape == (9, 1, 8, 8)
        assert test.features.shape == (3, 1, 8, 8)
        assert train.input_shape == (1, 8, 8)
        assert train.class_names == ("lesion", "normal")
        assert float(train.features.min()) >= 0.0
        assert float(train.features.max()) <= 1.0
        # The bright square (rows 5-15, cols 6-18 of 20x24) survives loading at 8x8.
        centre = train.features[:, 0, 3:5, 3:5].mean(dim=(1, 2))
        assert bool((centre[train.labels == 0] > 0.9).all())
        assert bool((centre[train.labels == 1] < 0.9).all())
        assert train.summary()["input_shape"] == [1, 8, 8]

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
        kw = {"image_size": 8, "split": "train", "test_fraction": 0.2, "seed": 0}
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
                root, labels_file="labels.csv", image_size=8, split="train", test_fraction=0, seed=0
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
        )
        assert ds.features.shape == (3, 1, 6, 6, 6)
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
            )
