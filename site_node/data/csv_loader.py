"""Tabular data from a CSV file: numeric feature columns and one label column.

The file needs a header row. Every column other than the label column and the configured
``exclude_columns`` (e.g. a record id) is a feature and must hold finite numbers. Features are
standardised with the mean and standard deviation of the *train* split only, so the test split
never influences training.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from site_node.data.dataset import LocalDataset, Split, encode_labels, split_indices
from site_node.errors import (
    DatasetError,
    EmptyDatasetError,
    MissingColumnError,
    MissingFileError,
    NonNumericValueError,
)

__all__ = ["load_csv", "standardise"]


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale columns to zero mean, unit variance with statistics from ``train`` only.

    Constant columns are centred but not scaled. Returns ``[train, *others]`` transformed.
    """
    mean = train.mean(axis=0) if len(train) else np.zeros(train.shape[1])
    std = train.std(axis=0) if len(train) else np.ones(train.shape[1])
    std = np.where(std > 0, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def load_csv(
    path: Path,
    *,
    label_column: str,
    split: Split,
    test_fraction: float,
    seed: int,
    exclude_columns: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    dataset_id: str | None = None,
) -> LocalDataset:
    """Load one split of a CSV dataset.

    Raises:
        MissingFileError: the file does not exist.
        EmptyDatasetError: no header or no data rows.
        MissingColumnError: the label column (or an excluded column) is absent.
        NonNumericValueError: a feature cell is not a finite number (column and line named).
        UnknownLabelError: a label is not in ``classes``.
    """
    if not path.is_file():
        raise MissingFileError(f"CSV file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        rows = [r for r in reader if any(cell.strip() for cell in r)]
    if not header or not any(h.strip() for h in header):
        raise EmptyDatasetError(f"CSV file {path.name} is empty (no header row)")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DatasetError(f"CSV file {path.name} has duplicate column names")
    if label_column not in header:
        raise MissingColumnError(
            f"CSV file {path.name} has no label column {label_column!r}; columns: {header}",
            hint="set `label_column` in the dataset configuration",
        )
    missing = [c for c in exclude_columns if c not in header]
    if missing:
        raise MissingColumnError(f"CSV file {path.name} has no column(s) {missing} to exclude")
    if not rows:
        raise EmptyDatasetError(f"CSV file {path.name} has a header but no data rows")

    label_idx = header.index(label_column)
    feature_idx = [
        i for i, h in enumerate(header) if i != label_idx and h not in set(exclude_columns)
    ]
    if not feature_idx:
        raise DatasetError(f"CSV file {path.name} has no feature columns")
    matrix = np.empty((len(rows), len(feature_idx)), dtype=np.float64)
    for r, row in enumerate(rows):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            raise DatasetError(
                f"CSV file {path.name} line {line} has {len(row)} cells, expected {len(header)}"
            )
        for c, i in enumerate(feature_idx):
            try:
                value = float(row[i])
            except ValueError:
                raise NonNumericValueError(
                    f"CSV file {path.name}: column {header[i]!r} line {line} is not a number",
                    hint="drop non-numeric columns with `exclude_columns` or encode them",
                ) from None
            if not math.isfinite(value):
                raise NonNumericValueError(
                    f"CSV file {path.name}: column {header[i]!r} line {line} is not finite"
                )
            matrix[r, c] = value
    labels, class_names = encode_labels(
        [row[label_idx] for row in rows], classes=classes, source=f"CSV file {path.name}"
    )
    train_idx, test_idx = split_indices(labels, test_fraction=test_fraction, seed=seed)
    x_train, x_test = standardise(matrix[train_idx], matrix[test_idx])
    x, idx = (x_train, train_idx) if split == "train" else (x_test, test_idx)
    return LocalDataset(
        features=torch.from_numpy(x),
        labels=torch.from_numpy(labels[idx]),
        num_classes=len(class_names),
        modality="tabular",
        feature_names=tuple(header[i] for i in feature_idx),
        class_names=class_names,
        split=split,
        dataset_id=dataset_id,
    )
