"""Decathlon datasets (dataset.json + NIfTI pairs), declared preprocessing and the record
cache, on small volumes the tests write (16^3, label spheres)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from concord_protocol.preprocessing import PreprocessingSpec
from site_node.data.cache import RecordCache
from site_node.data.dataset import split_key, split_position
from site_node.data.decathlon import load_decathlon
from site_node.data.publish import catalogue_entry
from site_node.data.registry import DatasetConfig, load_dataset
from site_node.errors import DatasetError, PreprocessingError
from tests.support.volumes import SIDE, write_case, write_decathlon, write_index


def _load(root: Path, split: str = "train", **kw: Any) -> Any:
    args: dict[str, Any] = {"test_fraction": 0.0, "seed": 0, "image_size": SIDE}
    args.update(kw)
    return load_decathlon(root, split=split, **args)


def _code(exc: pytest.ExceptionInfo[DatasetError]) -> str:
    return exc.value.code


SPEC = PreprocessingSpec.model_validate(
    {
        "steps": [
            {"op": "orientation", "axcodes": "RAS"},
            {"op": "spacing", "pixdim": [1.0, 1.0, 1.0]},
            {"op": "scale_intensity_range", "a_min": 0, "a_max": 100, "b_min": 0, "b_max": 1},
            {"op": "crop_or_pad", "spatial_size": [20, 20, 20]},
            {"op": "resize", "spatial_size": [12, 12, 12], "mode": "area"},
        ]
    }
)


class TestLoading:
    def test_a_decathlon_folder_is_a_segmentation_dataset_with_its_declared_labels(
        self, tmp_path: Path
    ) -> None:
        root = write_decathlon(tmp_path / "Task")
        ds = _load(root, image_size=8)
        assert ds.task == "segmentation"
        assert ds.features.shape == (6, 1, 8, 8, 8)
        assert ds.features.dtype == torch.float32
        assert ds.labels.shape == (6, 8, 8, 8)
        assert ds.labels.dtype == torch.int64
        assert ds.num_classes == 3
        assert ds.class_names == ("background", "tumour", "cyst")
        assert ds.modality == "MRI"
        assert set(torch.unique(ds.labels).tolist()) <= {0, 1, 2}
        # Per-record scaling by default: each record spans [0, 1].
        assert float(ds.features.min()) == pytest.approx(0.0, abs=1e-6)
        assert float(ds.features.max()) == pytest.approx(1.0)
        # Records in which each class occurs; never voxel counts.
        assert ds.label_counts() == [6, 6, 3]

    def test_the_registry_loads_it_and_the_catalogue_entry_says_segmentation(
        self, tmp_path: Path
    ) -> None:
        root = write_decathlon(tmp_path / "Task")
        config = DatasetConfig(
            id="tiny-seg", kind="decathlon", path=root, image_size=8, test_fraction=0.3
        )
        train = load_dataset(config, split="train")
        test = load_dataset(config, split="test")
        assert len(train) + len(test) == 6
        assert train.dataset_id == "tiny-seg"
        entry = catalogue_entry(config, {"id": "tiny-seg"})
        assert entry["task"] == "segmentation"
        assert entry["feature_summary"]["input_shape"] == [1, 8, 8, 8]
        assert entry["feature_summary"]["num_classes"] == 3
        assert entry["record_count"] == 6

    def test_decathlon_takes_its_classes_from_dataset_json(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match=r"takes its classes from dataset\.json"):
            DatasetConfig(id="x", kind="decathlon", path=tmp_path, classes=("a", "b"))
        with pytest.raises(ValidationError, match="needs `path`"):
            DatasetConfig(id="x", kind="decathlon")

    def test_the_split_is_keyed_by_case_id_and_a_new_case_moves_no_other(
        self, tmp_path: Path
    ) -> None:
        root = write_decathlon(tmp_path / "Task", n=8)
        key = split_key(5)
        ids = [f"case_{i:03d}" for i in range(9)]
        expected = [i for i in range(8) if split_position(ids[i], key) < 0.4]
        before = _load(root, "test", test_fraction=0.4, seed=5)
        assert len(before) == len(expected) > 0
        training = json.loads((root / "dataset.json").read_text())["training"]
        write_index(root, [*training, write_case(root, 8)])
        after = _load(root, "test", test_fraction=0.4, seed=5)
        # Every record of the test split before is in it after, bit for bit.
        for record in before.labels:
            assert any(torch.equal(record, other) for other in after.labels)
        grew = int(split_position(ids[8], key) < 0.4)
        assert len(after) == len(before) + grew


class TestPreprocessing:
    def test_declared_steps_give_the_declared_shape_and_keep_label_values(
        self, tmp_path: Path
    ) -> None:
        root = write_decathlon(tmp_path / "Task")
        ds = _load(root, preprocessing=SPEC, image_size=8)
        assert SPEC.output_spatial_shape() == (12, 12, 12)
        assert ds.features.shape == (6, 1, 12, 12, 12)  # the contract's size, not image_size
        assert ds.labels.shape == (6, 12, 12, 12)
        assert set(torch.unique(ds.labels).tolist()) == {0, 1, 2}
        # The declared window [0, 100] -> [0, 1], clipped: the tumour is at 1.
        assert float(ds.features.max()) == pytest.approx(1.0)
        assert float(ds.features.min()) >= 0.0

    def test_labels_are_resampled_nearest_so_each_class_keeps_its_exact_volume(
        self, tmp_path: Path
    ) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        raw = _load(root, image_size=SIDE)  # default path at the file's own size
        double = PreprocessingSpec.model_validate(
            {"steps": [{"op": "resize", "spatial_size": [32, 32, 32], "mode": "linear"}]}
        )
        ds = _load(root, preprocessing=double)
        for before, after in zip(raw.labels, ds.labels, strict=True):
            for cls in (1, 2):
                assert int((after == cls).sum()) == 8 * int((before == cls).sum())

    def test_orientation_uses_the_affine_for_image_and_label_alike(self, tmp_path: Path) -> None:
        flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored left-to-right: LAS
        las = write_decathlon(tmp_path / "las", n=2, affine=flipped)
        ras = write_decathlon(tmp_path / "ras", n=2)
        spec = PreprocessingSpec.model_validate(
            {"steps": [{"op": "orientation", "axcodes": "RAS"}]}
        )
        reoriented = _load(las, preprocessing=spec)
        plain = _load(ras, preprocessing=spec)
        # The same voxels stored mirrored come out mirrored back to RAS.
        assert torch.equal(reoriented.labels, torch.flip(plain.labels, dims=[1]))
        assert torch.allclose(reoriented.features, torch.flip(plain.features, dims=[2]))

    def test_steps_not_fixing_the_size_end_at_the_dataset_image_size(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        spec = PreprocessingSpec.model_validate(
            {"steps": [{"op": "spacing", "pixdim": [2.0, 2.0, 2.0]}]}
        )
        assert spec.output_spatial_shape() is None
        ds = _load(root, preprocessing=spec, image_size=10)
        assert ds.features.shape == (2, 1, 10, 10, 10)
        # Declared values only: no per-record scaling took place (raw intensities).
        assert float(ds.features.max()) > 1.0

    def test_steps_for_other_axes_are_refused_with_the_file_named(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        flat = PreprocessingSpec.model_validate(
            {"steps": [{"op": "resize", "spatial_size": [8, 8]}]}
        )
        with pytest.raises(PreprocessingError, match=r"case_00\d\.nii\.gz") as info:
            _load(root, preprocessing=flat)
        assert info.value.code == "data.preprocessing_mismatch"

    @pytest.mark.parametrize(
        ("config", "why"),
        [
            ({"kind": "csv", "classes": ("a", "b")}, "csv"),
            ({"kind": "demo_synthetic_volumes", "site_index": 0}, "demo"),
            ({"kind": "nifti", "classes": ("0", "1")}, "central slices"),
        ],
        ids=["tabular", "demo", "central-slice"],
    )
    def test_kinds_that_cannot_apply_preprocessing_refuse_it(
        self, tmp_path: Path, config: dict[str, Any], why: str
    ) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        path = {"path": root} if config["kind"] in ("csv", "nifti") else {}
        cfg = DatasetConfig.model_validate({"id": "x", **config, **path})
        with pytest.raises(PreprocessingError) as info:
            load_dataset(cfg, split="train", preprocessing=SPEC)
        assert info.value.code == "data.preprocessing_unsupported"


class TestRefusals:
    def test_missing_folder_index_or_file(self, tmp_path: Path) -> None:
        with pytest.raises(DatasetError) as info:
            _load(tmp_path / "nowhere")
        assert _code(info) == "data.missing_file"
        root = write_decathlon(tmp_path / "Task", n=2)
        (root / "dataset.json").unlink()
        with pytest.raises(DatasetError, match=r"dataset\.json not found") as info:
            _load(root)
        assert _code(info) == "data.missing_file"
        write_index(
            root, [{"image": "./imagesTr/gone.nii.gz", "label": "./labelsTr/case_000.nii.gz"}]
        )
        with pytest.raises(DatasetError, match=r"training\[0\]\.image.*gone\.nii\.gz") as info:
            _load(root)
        assert _code(info) == "data.missing_file"

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ("{not json", "not valid JSON"),
            ("[]", "JSON object"),
            ({"labels": {"0": "bg", "2": "x"}}, "'labels' must be 0 .. 1"),
            ({"labels": {"0": "bg"}}, "at least 2"),
            ({"labels": ["bg", "x"]}, "'labels' must map"),
            ({"modality": {}}, "'modality' needs at least 1"),
            ({"training": {"image": "x"}}, "'training' must be a list"),
            ({"training": [{"image": "./imagesTr/case_000.nii.gz"}]}, r"training\[0\] must"),
            ({"training": [{"image": 3, "label": "x"}]}, r"training\[0\]\.image must be"),
        ],
        ids=[
            "not-json",
            "not-object",
            "label-gap",
            "one-label",
            "labels-list",
            "no-modality",
            "training-object",
            "no-label",
            "path-not-text",
        ],
    )
    def test_a_malformed_index_names_the_field(
        self, tmp_path: Path, body: object, field: str
    ) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        if isinstance(body, str):
            (root / "dataset.json").write_text(body)
        else:
            write_index(root, [write_case(root, 0), write_case(root, 1)], **body)  # type: ignore[arg-type]
        with pytest.raises(DatasetError, match=field) as info:
            _load(root)
        assert _code(info) == "data.invalid_index"

    @pytest.mark.parametrize("path", ["../outside.nii.gz", "/etc/passwd", "imagesTr/../../x"])
    def test_paths_escaping_the_folder_are_refused(self, tmp_path: Path, path: str) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        (tmp_path / "outside.nii.gz").write_bytes(b"")
        write_index(root, [{"image": path, "label": "./labelsTr/case_000.nii.gz"}])
        with pytest.raises(DatasetError, match="outside the dataset folder") as info:
            _load(root)
        assert _code(info) == "data.path_outside"

    def test_a_link_out_of_the_folder_is_refused(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        secret = tmp_path / "elsewhere.nii.gz"
        secret.write_bytes((root / "imagesTr" / "case_000.nii.gz").read_bytes())
        os.symlink(secret, root / "imagesTr" / "link.nii.gz")
        write_index(
            root, [{"image": "./imagesTr/link.nii.gz", "label": "./labelsTr/case_000.nii.gz"}]
        )
        with pytest.raises(DatasetError) as info:
            _load(root)
        assert _code(info) == "data.path_outside"

    def test_a_label_value_outside_the_declared_labels_is_refused_without_the_value(
        self, tmp_path: Path
    ) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        label = np.zeros((SIDE,) * 3, dtype=np.uint8)
        label[2:4, 2:4, 2:4] = 9
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / "case_001.nii.gz"))
        with pytest.raises(DatasetError, match=r"labelsTr/case_001\.nii\.gz") as info:
            _load(root)
        assert _code(info) == "data.undeclared_label_value"
        assert "9" not in info.value.message
        half = np.full((SIDE,) * 3, 0.5, dtype=np.float32)  # a blend is not a label either
        nib.save(nib.Nifti1Image(half, np.eye(4)), str(root / "labelsTr" / "case_001.nii.gz"))
        with pytest.raises(DatasetError) as info:
            _load(root)
        assert _code(info) == "data.undeclared_label_value"

    def test_an_image_and_label_of_different_shapes_are_refused(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        small = np.zeros((SIDE, SIDE, 12), dtype=np.uint8)
        nib.save(nib.Nifti1Image(small, np.eye(4)), str(root / "labelsTr" / "case_000.nii.gz"))
        with pytest.raises(DatasetError, match=r"case_000\.nii\.gz.*\[16, 16, 12\]") as info:
            _load(root)
        assert _code(info) == "data.shape_mismatch"

    def test_an_image_without_the_declared_modalities_is_refused(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        training = json.loads((root / "dataset.json").read_text())["training"]
        write_index(root, training, modality={"0": "FLAIR", "1": "T1w"})
        with pytest.raises(DatasetError, match=r"1 channel.*2 modalities") as info:
            _load(root)
        assert _code(info) == "data.shape_mismatch"

    def test_multi_modal_images_keep_their_channels(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        for i in range(2):
            path = root / "imagesTr" / f"case_{i:03d}.nii.gz"
            volume = np.asarray(nib.load(str(path)).dataobj)
            nib.save(nib.Nifti1Image(np.stack([volume, -volume], axis=-1), np.eye(4)), str(path))
        training = json.loads((root / "dataset.json").read_text())["training"]
        write_index(root, training, modality={"0": "FLAIR", "1": "T1w"})
        ds = _load(root, image_size=8)
        assert ds.features.shape == (2, 2, 8, 8, 8)
        assert ds.modality == "FLAIR/T1w"

    def test_an_undecodable_file_is_refused_by_name(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        (root / "imagesTr" / "case_001.nii.gz").write_bytes(b"not a nifti" * 20)
        with pytest.raises(DatasetError, match=r"case_001") as info:
            _load(root)
        assert _code(info) == "data.unreadable"

    def test_two_entries_of_one_case_are_refused(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=2)
        training = json.loads((root / "dataset.json").read_text())["training"]
        write_index(root, [*training, training[0]])
        with pytest.raises(DatasetError, match=r"training\[2\] and training\[0\]") as info:
            _load(root)
        assert _code(info) == "data.duplicate_record"


class TestCache:
    def test_the_second_load_is_served_from_the_cache(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=4)
        cache = RecordCache(max_bytes=2**20)
        first = _load(root, preprocessing=SPEC, cache=cache)
        assert (cache.stats.hits, cache.stats.misses) == (0, 4)
        second = _load(root, preprocessing=SPEC, cache=cache)
        assert (cache.stats.hits, cache.stats.misses) == (4, 4)
        assert torch.equal(first.features, second.features)
        assert torch.equal(first.labels, second.labels)
        # Another preprocessing is another record; so is a file changed since.
        _load(root, image_size=8, cache=cache)
        assert cache.stats.misses == 8
        path = root / "imagesTr" / "case_002.nii.gz"
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        _load(root, preprocessing=SPEC, cache=cache)
        assert (cache.stats.hits, cache.stats.misses) == (7, 9)

    def test_the_memory_bound_holds(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=5)
        record = 12**3 * (4 + 8)  # float32 image + int64 label
        cache = RecordCache(max_bytes=2 * record + 10)
        _load(root, preprocessing=SPEC, cache=cache)
        assert cache.stats.entries == 2
        assert cache.stats.bytes <= cache.max_bytes
        assert cache.stats.evictions == 3
        _load(root, preprocessing=SPEC, cache=cache)  # LRU over 5 records: every one missed
        assert cache.stats.hits == 0
        assert cache.stats.bytes <= cache.max_bytes
        tiny = RecordCache(max_bytes=record - 1)  # a record larger than the bound: not kept
        _load(root, preprocessing=SPEC, cache=tiny)
        assert (tiny.stats.entries, tiny.stats.bytes) == (0, 0)

    def test_the_directory_tier_serves_a_new_process_within_its_bound(self, tmp_path: Path) -> None:
        root = write_decathlon(tmp_path / "Task", n=4)
        folder = tmp_path / "cache"
        first = RecordCache(max_bytes=0, directory=folder, directory_max_bytes=2**20)
        expected = _load(root, preprocessing=SPEC, cache=first)
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        files = sorted(folder.glob("*.npz"))
        assert len(files) == 4
        assert all(f.stat().st_mode & 0o077 == 0 for f in files)
        fresh = RecordCache(max_bytes=2**20, directory=folder, directory_max_bytes=2**20)
        again = _load(root, preprocessing=SPEC, cache=fresh)
        assert (fresh.stats.disk_hits, fresh.stats.misses) == (4, 0)
        assert torch.equal(expected.features, again.features)
        # A damaged file is read again from the data, not trusted.
        files[0].write_bytes(b"garbage")
        damaged = RecordCache(max_bytes=0, directory=folder, directory_max_bytes=2**20)
        _load(root, preprocessing=SPEC, cache=damaged)
        assert (damaged.stats.disk_hits, damaged.stats.misses) == (3, 1)
        # The bound holds: room for two files of ~20 kB.
        size = files[1].stat().st_size
        small = RecordCache(max_bytes=0, directory=tmp_path / "small", directory_max_bytes=2 * size)
        _load(root, preprocessing=SPEC, cache=small)
        held = sum(f.stat().st_size for f in (tmp_path / "small").glob("*.npz"))
        assert 0 < held <= 2 * size
