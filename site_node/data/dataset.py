"""The in-memory form of a local dataset, plus helpers shared by the loaders.

A :class:`LocalDataset` is what training consumes: a float32 feature tensor, int64 labels and
the metadata needed to pick a model (input shape, number of classes). Its :meth:`summary` is
what may leave the site for the dataset catalogue: counts and shapes, never records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from site_node.errors import DatasetError, EmptyDatasetError, UnknownLabelError

__all__ = ["LocalDataset", "Split", "encode_labels", "split_indices"]

Split = Literal["train", "test"]


@dataclass(frozen=True, eq=False)
class LocalDataset:
    """Features and labels of one split of one local dataset, held in memory.

    Attributes:
        features: float32 tensor of shape ``(N, *input_shape)``; images are channel-first.
        labels: int64 tensor of shape ``(N,)`` with values in ``[0, num_classes)``.
        num_classes: number of classes of the task (may exceed the classes present).
        modality: e.g. ``"tabular"``, ``"image"``, ``"CT"``, ``"MR"``.
        feature_names: column names for tabular data, else ``None``.
        class_names: display names of classes ``0..num_classes-1``.
        split: ``"train"`` or ``"test"``.
        dataset_id: the catalogue id, when loaded from a :class:`DatasetConfig`.
    """

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    modality: str
    feature_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    split: Split = "train"
    dataset_id: str | None = None

    def __post_init__(self) -> None:
        if self.features.dtype != torch.float32:
            raise DatasetError(f"features must be float32, got {self.features.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
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
        """Number of records per class, index = class."""
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
            "label_counts": dict(zip(names, self.label_counts(), strict=True)),
        }
        if self.dataset_id is not None:
            out["dataset_id"] = self.dataset_id
        if self.feature_names is not None:
            out["feature_names"] = list(self.feature_names)
        return out


def split_indices(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test indices, stratified by label when every class allows it.

    Returns sorted index arrays. With ``test_fraction == 0`` everything is train.
    """
    n = len(labels)
    if n == 0:
        raise EmptyDatasetError("the dataset has no records")
    idx = np.arange(n)
    if test_fraction <= 0:
        return idx, idx[:0]
    n_test = max(1, round(n * test_fraction))
    if n_test >= n:
        raise EmptyDatasetError(
            f"{n} records are too few for a test fraction of {test_fraction}",
            hint="lower test_fraction or add records",
        )
    _, counts = np.unique(labels, return_counts=True)
    n_classes = len(counts)
    stratify = (
        labels if counts.min() >= 2 and n_test >= n_classes and n - n_test >= n_classes else None
    )
    train, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)


def encode_labels(
    raw: Sequence[str], *, classes: Sequence[str] | None, source: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw label strings to class indices.

    With ``classes`` given, the index is the position in that list and any other label is an
    :class:`UnknownLabelError`. Without it, labels that are all non-negative integers are used
    as-is (classes ``0..max``); otherwise the sorted distinct labels define the classes.
    """
    values = [r.strip() for r in raw]
    if classes is not None:
        lookup = {c: i for i, c in enumerate(classes)}
        for row, value in enumerate(values, start=1):
            if value not in lookup:
                raise UnknownLabelError(
                    f"{source}: record {row} has label {value!r}, not one of the configured "
                    f"classes {list(classes)}",
                    hint="fix the label or add it to `classes` in the dataset configuration",
                )
        return np.array([lookup[v] for v in values], dtype=np.int64), tuple(classes)
    if all(v.isdigit() for v in values):
        ints = np.array([int(v) for v in values], dtype=np.int64)
        top = int(ints.max()) if len(ints) else 1
        return ints, tuple(str(i) for i in range(max(top + 1, 2)))
    distinct = tuple(sorted(set(values)))
    if "" in distinct:
        raise UnknownLabelError(f"{source}: a record has an empty label")
    lookup = {c: i for i, c in enumerate(distinct)}
    return np.array([lookup[v] for v in values], dtype=np.int64), distinct
