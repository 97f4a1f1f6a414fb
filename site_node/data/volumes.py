"""Medical volumes: NIfTI (``.nii``/``.nii.gz``) and DICOM, indexed by ``labels.csv``.

``labels.csv`` has ``filename,label``; ``filename`` is a NIfTI file, a DICOM file, or (DICOM)
a folder holding one series. Each entry is read with MONAI's ``LoadImage`` (``NibabelReader``
or ``PydicomReader``), made channel-first, reduced to one channel (mean), then:

* ``volume_mode="central_slice"`` (default): the middle slice along the last spatial axis
  (axial for RAS/LPS-ordered data) is taken, resized to ``image_size x image_size``; the
  result is ``(1, S, S)``, so the 2D catalogue models apply. A 2D input (one DICOM slice) is
  used as it is.
* ``volume_mode="volume"``: the whole volume is resized to ``S x S x S``: ``(1, S, S, S)``.

Intensities are scaled to [0, 1] per record (``ScaleIntensity``) after resizing: each
record's preprocessing reads that record alone, the train/test assignment is a keyed hash of
its file name (:func:`~site_node.data.dataset.assign_split`) and the class set is the
configured ``classes``, so no statistic of the other patients enters a record's input.

A DICOM series is a folder of its slices, named in ``labels.csv`` like a file and keyed by
that folder name; MONAI's ``PydicomReader`` stacks the slices into one volume by their
positions. A folder holding slices of more than one series (``SeriesInstanceUID``) is
refused (``data.mixed_series``).

A study's declared preprocessing (:mod:`site_node.data.preprocess`) applies in
``volume_mode="volume"`` only: the (one-channel) volume goes through its steps, then is
resized to ``image_size`` on every axis only when no step fixes the size; it replaces the
per-record scaling (only declared values shape the input). Records are cached
(:class:`~site_node.data.cache.RecordCache`) by their files and that recipe.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import torch
from monai.data import NibabelReader, PydicomReader
from monai.transforms import LoadImage, Resize, ScaleIntensity

from concord_protocol.errors import IncompatibleInputError
from concord_protocol.preprocessing import PreprocessingSpec
from site_node.data._labels import plain_tensor, read_labels_file
from site_node.data.cache import RecordCache
from site_node.data.dataset import (
    LocalDataset,
    Split,
    assign_split,
    check_split_size,
    encode_labels,
)
from site_node.data.preprocess import IMAGE, apply_preprocessing
from site_node.errors import DatasetError, PreprocessingError, UnreadableFileError

__all__ = ["VolumeMode", "load_volumes"]

VolumeMode = Literal["central_slice", "volume"]
#: Version of how a record is made from its file (a new one invalidates cached records).
_RECIPE = "volumes/v1"


def _reader(fmt: Literal["nifti", "dicom"]) -> NibabelReader | PydicomReader:
    return NibabelReader() if fmt == "nifti" else PydicomReader()


def _check_one_series(folder: Path, name: str) -> None:
    """Refuse a series folder whose slices name more than one ``SeriesInstanceUID``."""
    uids: set[str] = set()
    for item in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            header = pydicom.dcmread(
                item, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
            )
        except Exception:  # noqa: S112 - not DICOM: the reader refuses the folder by name
            continue
        uid = header.get("SeriesInstanceUID")
        if uid is not None:
            uids.add(str(uid))
    if len(uids) > 1:
        raise DatasetError(
            f"series folder {name!r} holds slices of {len(uids)} series",
            code="data.mixed_series",
            hint="give each series its own folder (one row of labels.csv each)",
        )


def _prepare(
    image: torch.Tensor,
    *,
    image_size: int,
    mode: VolumeMode,
    name: str,
    preprocessing: PreprocessingSpec | None = None,
) -> torch.Tensor:
    """Channel-first array -> ``(1, S, S)`` or ``(1, S, S, S)`` scaled to [0, 1]; with
    declared preprocessing (volumes only), its steps instead (see the module docstring)."""
    image = image.mean(dim=0, keepdim=True) if image.shape[0] > 1 else image
    if preprocessing is not None and preprocessing.steps:
        if image.ndim - 1 != 3:
            raise PreprocessingError(
                f"{name!r} is not a volume ({image.ndim - 1} spatial dimensions)",
                code="data.preprocessing_unsupported",
            )
        out = apply_preprocessing(
            {IMAGE: image}, preprocessing, name=name, fallback_size=image_size
        )
        return plain_tensor(out[IMAGE])
    spatial = image.ndim - 1
    if mode == "central_slice":
        if spatial == 3:
            image = image[..., image.shape[-1] // 2]  # index 0 when depth is 1
        elif spatial != 2:
            raise IncompatibleInputError(f"{name!r} has {spatial} spatial dimensions")
        size: tuple[int, ...] = (image_size, image_size)
    else:
        if spatial != 3:
            raise IncompatibleInputError(
                f"{name!r} is not a volume ({spatial} spatial dimensions)",
                hint="use volume_mode='central_slice' for 2D inputs",
            )
        size = (image_size, image_size, image_size)
    resized = Resize(size)(image)
    return plain_tensor(ScaleIntensity()(resized)).reshape(1, *size)


def load_volumes(
    root: Path,
    *,
    fmt: Literal["nifti", "dicom"],
    labels_file: str,
    image_size: int,
    split: Split,
    test_fraction: float,
    seed: int,
    volume_mode: VolumeMode = "central_slice",
    classes: Sequence[str],
    modality: str | None = None,
    dataset_id: str | None = None,
    preprocessing: PreprocessingSpec | None = None,
    cache: RecordCache | None = None,
) -> LocalDataset:
    """Load one split of a NIfTI or DICOM collection (see the module docstring for shapes).

    Raises:
        MissingFileError: the folder, the labels file or a listed file is missing.
        UnknownLabelError: a label is not in ``classes``.
        UnreadableFileError: a file cannot be decoded as ``fmt``.
        DatasetError: a series folder holds several series (``data.mixed_series``).
        PreprocessingError: declared preprocessing with ``volume_mode="central_slice"``
            (``data.preprocessing_unsupported``) or for other spatial axes.
    """
    spec = preprocessing or PreprocessingSpec()
    if spec.steps and volume_mode != "volume":
        raise PreprocessingError(
            "the study declares preprocessing, which applies to whole volumes only; this "
            "dataset takes central slices",
            code="data.preprocessing_unsupported",
            hint="register the dataset with volume_mode: volume to use it in such studies",
        )
    entries = read_labels_file(root, labels_file)
    labels, class_names = encode_labels(
        [label for _, label in entries], classes=classes, source=f"labels file {labels_file!r}"
    )
    base = root.resolve()
    train_idx, test_idx = assign_split(
        [path.relative_to(base).as_posix() for path, _ in entries],
        test_fraction=test_fraction,
        seed=seed,
    )
    idx = train_idx if split == "train" else test_idx
    check_split_size(
        len(idx), split=split, total=len(entries), source=f"labels file {labels_file!r}"
    )
    with warnings.catch_warnings():
        # MONAI probes for NVIDIA's nvImageCodec (absent on CPU nodes) and warns.
        warnings.simplefilter("ignore", UserWarning)
        loader = LoadImage(image_only=True, ensure_channel_first=True, reader=_reader(fmt))
    recipe = {
        "loader": _RECIPE,
        "format": fmt,
        "image_size": image_size,
        "volume_mode": volume_mode,
        "preprocessing": spec.digest() if spec.steps else None,
    }
    records: list[np.ndarray] = []
    for i in idx:
        path = entries[int(i)][0]
        name = path.relative_to(base).as_posix()

        def load(path: Path = path, name: str = name) -> tuple[np.ndarray, ...]:
            if fmt == "dicom" and path.is_dir():
                _check_one_series(path, name)
            try:
                with warnings.catch_warnings():
                    # Missing orientation tags only affect the affine (identity then).
                    warnings.simplefilter("ignore", UserWarning)
                    raw = loader(str(path))
            except Exception as exc:  # MONAI wraps reader errors in RuntimeError
                raise UnreadableFileError(
                    f"{name!r} cannot be read as {fmt}: {type(exc).__name__}"
                ) from exc
            image = raw if spec.steps else plain_tensor(raw)
            prepared = _prepare(
                image, image_size=image_size, mode=volume_mode, name=name, preprocessing=spec
            )
            return (prepared.numpy(),)

        record = cache.get_or_load([path], recipe, load) if cache is not None else load()
        records.append(record[0])
    return LocalDataset(
        features=torch.from_numpy(np.stack(records)),
        labels=torch.from_numpy(np.asarray(labels[idx], dtype=np.int64)),
        num_classes=len(class_names),
        modality=modality or ("MR/CT" if fmt == "nifti" else "DICOM"),
        class_names=class_names,
        split=split,
        dataset_id=dataset_id,
    )
