"""Tabular data from a CSV file: numeric feature columns and one label column.

The file needs a header row. Every column other than the label column, the ``id_column``
and the configured ``exclude_columns`` is a feature and must hold finite numbers.

Nothing here reads a statistic of the data, so preprocessing stays inside the privacy
guarantee (whose unit is one record):

* features are scaled with **declared ranges** (hospital IT's data dictionary: the
  plausible ``[low, high]`` of each column, a property of the measurement, not of these
  patients): clipped to the range, then mapped to ``[-1, 1]``. A column without a declared
  range is refused, unless the configuration declares ``scaling="none"``;
* a record's train/test assignment is a keyed hash of its id (``id_column``; without one,
  of the record's own cells), so no record moves another between splits;
* the class set is the configured ``classes``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from site_node.data.dataset import (
    LocalDataset,
    Split,
    assign_split,
    check_split_size,
    encode_labels,
)
from site_node.errors import (
    DatasetConfigError,
    DatasetError,
    EmptyDatasetError,
    MissingColumnError,
    MissingFileError,
    NonNumericValueError,
)

__all__ = ["FeatureRange", "load_csv", "read_ranges_file", "scale_to_ranges"]


FeatureRange = tuple[float, float]


def scale_to_ranges(matrix: np.ndarray, ranges: Sequence[FeatureRange]) -> np.ndarray:
    """Clip each column to its declared ``(low, high)`` and map it linearly to ``[-1, 1]``.

    Each record's result depends on that record and the declared ranges only.
    """
    low = np.array([r[0] for r in ranges], dtype=np.float64)
    high = np.array([r[1] for r in ranges], dtype=np.float64)
    clipped = np.clip(matrix, low, high)
    return (2.0 * (clipped - low) / (high - low) - 1.0).astype(np.float32)


def read_ranges_file(path: Path) -> dict[str, FeatureRange]:
    """A data dictionary of declared ranges: a CSV with header ``column,low,high``.

    Raises:
        MissingFileError: the file does not exist.
        DatasetError: a missing header column, a repeated column, a bound that is not a
            finite number, or ``low >= high`` (the line is named).
    """
    if not path.is_file():
        raise MissingFileError(f"feature ranges file {path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        rows = list(reader)
    for needed in ("column", "low", "high"):
        if needed not in fields:
            raise MissingColumnError(
                f"feature ranges file {path.name} has no {needed!r} column; columns: {fields}"
            )
    out: dict[str, FeatureRange] = {}
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        name = row["column"]
        if name in out:
            raise DatasetError(f"feature ranges file {path.name} line {line}: {name!r} repeated")
        try:
            low, high = float(row["low"]), float(row["high"])
        except ValueError:
            raise DatasetError(
                f"feature ranges file {path.name} line {line}: low and high must be numbers"
            ) from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise DatasetError(
                f"feature ranges file {path.name} line {line}: need finite low < high"
            )
        out[name] = (low, high)
    return out


def _declared(
    path: Path, features: Sequence[str], ranges: Mapping[str, FeatureRange]
) -> list[FeatureRange]:
    unknown = sorted(set(ranges) - set(features))
    if unknown:
        raise DatasetConfigError(
            f"CSV file {path.name}: ranges are declared for columns that are not features: "
            f"{unknown}"
        )
    missing = [f for f in features if f not in ranges]
    if missing:
        raise DatasetConfigError(
            f"CSV file {path.name}: no declared range for feature column(s) {missing}",
            hint="declare each feature's plausible [low, high] in `feature_ranges` or "
            "`feature_ranges_file` (never computed from the data), or set `scaling: none`",
        )
    return [ranges[f] for f in features]


def load_csv(
    path: Path,
    *,
    label_column: str,
    classes: Sequence[str],
    split: Split,
    test_fraction: float,
    seed: int,
    feature_ranges: Mapping[str, FeatureRange] | None = None,
    scaling: Literal["declared_ranges", "none"] = "declared_ranges",
    id_column: str | None = None,
    exclude_columns: Sequence[str] = (),
    dataset_id: str | None = None,
) -> LocalDataset:
    """Load one split of a CSV dataset (see the module docstring for what it reads).

    Raises:
        MissingFileError: the file does not exist.
        EmptyDatasetError: no header or no data rows, or none in the requested split.
        MissingColumnError: the label, id or an excluded column is absent.
        NonNumericValueError: a feature cell is not a finite number (column and line named).
        UnknownLabelError: a label is not in ``classes``.
        DatasetConfigError: a feature without a declared range (with ``declared_ranges``).
        DatasetError: repeated record ids.
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
    if id_column is not None and id_column not in header:
        raise MissingColumnError(f"CSV file {path.name} has no id column {id_column!r}")
    missing = [c for c in exclude_columns if c not in header]
    if missing:
        raise MissingColumnError(f"CSV file {path.name} has no column(s) {missing} to exclude")
    if not rows:
        raise EmptyDatasetError(f"CSV file {path.name} has a header but no data rows")

    label_idx = header.index(label_column)
    not_features = {*exclude_columns, *([id_column] if id_column else [])}
    feature_idx = [i for i, h in enumerate(header) if i != label_idx and h not in not_features]
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
    features = [header[i] for i in feature_idx]
    if scaling == "declared_ranges":
        matrix = scale_to_ranges(matrix, _declared(path, features, feature_ranges or {}))
    train_idx, test_idx = assign_split(
        _record_ids(path, header, rows, id_column), test_fraction=test_fraction, seed=seed
    )
    idx = train_idx if split == "train" else test_idx
    check_split_size(len(idx), split=split, total=len(rows), source=f"CSV file {path.name}")
    return LocalDataset(
        features=torch.from_numpy(np.ascontiguousarray(matrix[idx], dtype=np.float32)),
        labels=torch.from_numpy(labels[idx]),
        num_classes=len(class_names),
        modality="tabular",
        feature_names=tuple(features),
        class_names=class_names,
        split=split,
        dataset_id=dataset_id,
    )


def _record_ids(
    path: Path, header: Sequence[str], rows: Sequence[Sequence[str]], id_column: str | None
) -> list[str]:
    """Each record's id for the split: its ``id_column`` cell (unique), or its own cells."""
    if id_column is None:
        return ["\x1f".join(cell.strip() for cell in row) for row in rows]
    i = header.index(id_column)
    ids = [row[i].strip() for row in rows]
    seen: dict[str, int] = {}
    for line, rid in enumerate(ids, start=2):
        if not rid:
            raise DatasetError(f"CSV file {path.name} line {line} has an empty record id")
        if rid in seen:
            raise DatasetError(
                f"CSV file {path.name}: record id on line {line} repeats line {seen[rid]}"
            )
        seen[rid] = line
    return ids
