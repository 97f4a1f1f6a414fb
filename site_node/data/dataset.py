"""The in-memory form of a local dataset, plus helpers shared by the loaders.

A :class:`LocalDataset` is what training consumes: a float32 feature tensor, int64 labels and
the metadata needed to pick a model (input shape, number of classes). Its :meth:`summary` is
what may leave the site for the dataset catalogue: counts and shapes, never records.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from concord_protocol.contract import TaskKind
from site_node.errors import DatasetError, EmptyDatasetError, UnknownLabelError

__all__ = [
    "LocalDataset",
    "Split",
    "assign_split",
    "check_split_size",
    "encode_labels",
    "split_key",
    "split_position",
]

Split = Literal["train", "test"]


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """Features and labels of one split of one local dataset, held in memory.

    Attributes:
        features: float32 tensor of shape ``(N, *input_shape)``; images are channel-first.
        labels: int64 tensor with values in ``[0, num_classes)``: ``(N,)`` for
            classification, ``(N, *spatial)`` (one label per voxel, 0 the background) for
            segmentation.
        num_classes: number of classes of the task (may exceed the classes present); for
            segmentation, the background counts as a class.
        modality: e.g. ``"tabular"``, ``"image"``, ``"CT"``, ``"MR"``.
        feature_names: column names for tabular data, else ``None``.
        class_names: display names of classes ``0..num_classes-1``.
        split: ``"train"`` or ``"test"``.
        dataset_id: the catalogue id, when loaded from a :class:`DatasetConfig`.
        task: ``"classification"`` or ``"segmentation"``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    modality: str
    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    split: Split = "train"
    dataset_id: str | None = None
    task: TaskKind = "classification"

    def __post_init__(self) -> None:
        if self.features.dtype != torch.float32:
            raise DatasetError(f"features must be float32, got {self.features.dtype}")
        if self.labels.dtype != torch.int64:
            raise DatasetError("labels must be an int64 tensor")
        if self.task == "segmentation":
            if self.features.ndim not in (4, 5) or (
                tuple(self.labels.shape) != (self.features.shape[0], *self.features.shape[2:])
            ):
                raise DatasetError(
                    f"segmentation labels {tuple(self.labels.shape)} must give one label per "
                    f"voxel of the channel-first images {tuple(self.features.shape)}"
                )
        elif self.labels.ndim != 1:
            raise DatasetError("labels must be a 1-D int64 tensor")
        if self.features.ndim < 2 or self.features.shape[0] != self.labels.shape[0]:
            raise DatasetError(
                f"features {tuple(self.features.shape)} and labels "
                f"{tuple(self.labels.shape)} disagree on the number of records"
            )
        if self.num_classes < 2:
            raise DatasetError(f"a classification task needs >= 2 classes, got {self.num_classes}")
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes
        ):
            raise DatasetError(f"labels must lie in [0, {self.num_classes})")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DatasetError("class_names must name every class")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one record: ``(n_features,)`` or ``(channels, *spatial)``."""
        return tuple(int(d) for d in self.features.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_torch(self) -> TensorDataset:
        """A :class:`torch.utils.data.TensorDataset` over ``(features, labels)``."""
        return TensorDataset(self.features, self.labels)

    def label_counts(self) -> list[int]:
        """Number of records per class, index = class (segmentation: records in which the
        class occurs at all; never a voxel count, which would measure a patient's lesion)."""
        if self.task == "segmentation":
            flat = self.labels.reshape(len(self), -1)
            return [int((flat == c).any(dim=1).sum()) for c in range(self.num_classes)]
        return [int(c) for c in torch.bincount(self.labels, minlength=self.num_classes)]

    def summary(self) -> dict[str, Any]:
        """Non-identifying metadata for the dataset catalogue.

        Record count, input shape, modality, feature names (tabular) and per-class counts.
        No record, value or statistic of a feature is included.
        """
        names = self.class_names or tuple(str(i) for i in range(self.num_classes))
        out: dict[str, Any] = {
            "records": len(self),
            "split": self.split,
            "modality": self.modality,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "task": self.task,
            "label_counts": dict(zip(names, self.label_counts(), strict=True)),
        }
        if self.dataset_id is not None:
            out["dataset_id"] = self.dataset_id
        if self.feature_names is not None:
            out["feature_names"] = list(self.feature_names)
        return out


#: Domain separation of the split hash (a new version would reassign records).
_SPLIT_LABEL = b"concord/split/v1"


def split_key(seed: int) -> bytes:
    """The HMAC key of the train/test assignment for a dataset configured with ``seed``.

    The key is configuration, not data: it may be public. What matters for privacy is that
    a record's split depends on that record alone, never on the other records."""
    return _SPLIT_LABEL + b"\x00" + str(int(seed)).encode()


def split_position(record_id: str, key: bytes) -> float:
    """A record's position in [0, 1): the first 64 bits of HMAC-SHA256(key, id) / 2^64."""
    digest = hmac.new(key, record_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(
    record_ids: Sequence[str], *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (sorted) by a keyed hash of each record's id.

    A record is in the test split when its :func:`split_position` is below ``test_fraction``:
    the assignment of a record depends only on its own id and the configured key, so adding,
    removing or changing one record never moves another between train and test (the split
    stays inside the privacy guarantee's unit, one record). The test share is
    ``test_fraction`` in expectation, not exactly. With ``test_fraction == 0`` everything is
    train.

    Raises:
        EmptyDatasetError: no records.
    """
    n = len(record_ids)
    if n == 0:
        raise EmptyDatasetError("the dataset has no records")
    idx = np.arange(n)
    if test_fraction <= 0:
        return idx, idx[:0]
    key = split_key(seed)
    in_test = np.array([split_position(r, key) < test_fraction for r in record_ids], dtype=bool)
    return idx[~in_test], idx[in_test]


def check_split_size(size: int, *, split: Split, total: int, source: str) -> None:
    """Refuse an empty split with the reason and the remedy (never silently train on none)."""
    if size == 0:
        raise EmptyDatasetError(
            f"{source}: the keyed-hash split put none of the {total} records in the {split} split",
            hint="add records, change test_fraction, or change the split seed",
        )


def encode_labels(
    raw: Sequence[str], *, classes: Sequence[str], source: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw label strings to class indices: the position in the configured ``classes``.

    The class set is configuration, never inferred from the labels present (which classes a
    site holds would otherwise shape the model and leak with it). Any other label is an
    :class:`UnknownLabelError`.
    """
    if len(classes) < 2:
        raise UnknownLabelError(
            f"{source}: a classification task needs at least 2 configured classes",
            hint="list the task's classes in `classes` in the dataset configuration",
        )
    values = [r.strip() for r in raw]
    lookup = {c: i for i, c in enumerate(classes)}
    for row, value in enumerate(values, start=1):
        if value not in lookup:
            raise UnknownLabelError(
                f"{source}: record {row} has label {value!r}, not one of the configured "
                f"classes {list(classes)}",
                hint="fix the label or add it to `classes` in the dataset configuration",
            )
    return np.array([lookup[v] for v in values], dtype=np.int64), tuple(classes)
