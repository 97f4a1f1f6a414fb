"""2D images (PNG, JPEG, ...) in a folder, indexed by ``labels.csv`` (``filename,label``).

Each image is read with MONAI's ``LoadImage`` (PIL reader, rows first), made channel-first,
converted to one grayscale channel (mean of the colour channels; alpha dropped), resized to
``image_size x image_size`` and scaled to [0, 1] per image (``ScaleIntensity``).

Everything a record goes through depends on that record alone (the privacy guarantee's unit):
the intensity scaling uses the image's own range, the train/test assignment is a keyed hash
of its file name (:func:`~site_node.data.dataset.assign_split`) and the class set is the
configured ``classes``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

from site_node.data._labels import plain_tensor, read_labels_file
from site_node.data.dataset import (
    LocalDataset,
    Split,
    assign_split,
    check_split_size,
    encode_labels,
)
from site_node.errors import DatasetError

__all__ = ["load_image_folder", "to_grayscale"]


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    """Channel-first image to one channel: RGB(A) -> mean of the colour channels."""
    if image.shape[0] == 1:
        return image
    if image.shape[0] in (2, 4):  # LA or RGBA: drop alpha
        image = image[:-1]
    return image.mean(dim=0, keepdim=True)


def _transform(image_size: int) -> Compose:
    with warnings.catch_warnings():
        # MONAI probes for NVIDIA's nvImageCodec (absent on CPU nodes) and warns.
        warnings.simplefilter("ignore", UserWarning)
        load = LoadImage(image_only=True, reader=PILReader(reverse_indexing=False))
    return Compose(
        [
            load,
            EnsureChannelFirst(),
            to_grayscale,
            Resize((image_size, image_size)),
            ScaleIntensity(),
        ]
    )


def load_image_folder(
    root: Path,
    *,
    labels_file: str,
    image_size: int,
    split: Split,
    test_fraction: float,
    seed: int,
    classes: Sequence[str],
    modality: str = "image",
    dataset_id: str | None = None,
) -> LocalDataset:
    """Load one split of an image folder as ``(N, 1, image_size, image_size)`` float32.

    Raises:
        MissingFileError: the folder, the labels file or a listed image is missing.
        MissingColumnError: the labels file lacks ``filename`` or ``label``.
        UnknownLabelError: a label is not in ``classes``.
        DatasetError: an image cannot be decoded.
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
    transform = _transform(image_size)
    images = []
    for i in idx:
        path = entries[int(i)][0]
        try:
            image = transform(str(path))
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError
            raise DatasetError(f"image {path.name!r} cannot be read: {type(exc).__name__}") from exc
        images.append(plain_tensor(image).reshape(1, image_size, image_size))
    features = (
        torch.stack(images)
        if images
        else torch.zeros((0, 1, image_size, image_size), dtype=torch.float32)
    )
    return LocalDataset(
        features=features.contiguous(),
        labels=torch.from_numpy(np.asarray(labels[idx], dtype=np.int64)),
        num_classes=len(class_names),
        modality=modality,
        class_names=class_names,
        split=split,
        dataset_id=dataset_id,
    )
