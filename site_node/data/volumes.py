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
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import NibabelReader, PydicomReader
from monai.transforms import LoadImage, Resize, ScaleIntensity

from concord_protocol.errors import IncompatibleInputError
from site_node.data._labels import plain_tensor, read_labels_file
from site_node.data.dataset import (
    LocalDataset,
    Split,
    assign_split,
    check_split_size,
    encode_labels,
)
from site_node.errors import DatasetError

__all__ = ["VolumeMode", "load_volumes"]

VolumeMode = Literal["central_slice", "volume"]


def _reader(fmt: Literal["nifti", "dicom"]) -> NibabelReader | PydicomReader:
    return NibabelReader() if fmt == "nifti" else PydicomReader()


def _prepare(image: torch.Tensor, *, image_size: int, mode: VolumeMode, name: str) -> torch.Tensor:
    """Channel-first array -> ``(1, S, S)`` or ``(1, S, S, S)`` scaled to [0, 1]."""
    image = image.mean(dim=0, keepdim=True) if image.shape[0] > 1 else image
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
) -> LocalDataset:
    """Load one split of a NIfTI or DICOM collection (see the module docstring for shapes).

    Raises:
        MissingFileError: the folder, the labels file or a listed file is missing.
        UnknownLabelError: a label is not in ``classes``.
        DatasetError: a file cannot be decoded as ``fmt``.
    """
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
    records = []
    for i in idx:
        path = entries[int(i)][0]
        try:
            with warnings.catch_warnings():
                # Missing orientation tags only affect the affine, which we do not use.
                warnings.simplefilter("ignore", UserWarning)
                raw = loader(str(path))
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError
            raise DatasetError(
                f"{path.name!r} cannot be read as {fmt}: {type(exc).__name__}"
            ) from exc
        image = plain_tensor(raw)
        records.append(_prepare(image, image_size=image_size, mode=volume_mode, name=path.name))
    shape = (1, image_size, image_size) + ((image_size,) if volume_mode == "volume" else ())
    features = torch.stack(records) if records else torch.zeros((0, *shape))
    return LocalDataset(
        features=features.contiguous(),
        labels=torch.from_numpy(np.asarray(labels[idx], dtype=np.int64)),
        num_classes=len(class_names),
        modality=modality or ("MR/CT" if fmt == "nifti" else "DICOM"),
        class_names=class_names,
        split=split,
        dataset_id=dataset_id,
    )
