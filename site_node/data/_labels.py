"""Helpers of the file loaders: index files, paths inside the dataset folder, ``labels.csv``
(``filename,label``) and MONAI outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from monai.data import MetaTensor

from site_node.errors import (
    DatasetError,
    EmptyDatasetError,
    MissingColumnError,
    MissingFileError,
    PathOutsideDatasetError,
)

__all__ = ["index_file", "inside_folder", "plain_tensor", "read_labels_file"]


def plain_tensor(value: object) -> torch.Tensor:
    """A plain float32 :class:`torch.Tensor` (MONAI's ``MetaTensor`` metadata dropped)."""
    if isinstance(value, MetaTensor):
        return value.as_tensor().float()
    return torch.as_tensor(value).float()


def index_file(root: Path, name: str, *, described: str, hint: str) -> Path:
    """``root/name``: ``MissingFileError`` when the dataset folder or the file is missing."""
    if not root.is_dir():
        raise MissingFileError(f"dataset folder {root} does not exist")
    index = root / name
    if not index.is_file():
        raise MissingFileError(f"{described} not found in {root}", hint=hint)
    return index


def inside_folder(root: Path, name: str, *, where: str) -> Path:
    """``root/name`` resolved: an existing file or folder inside ``root``.

    Raises:
        PathOutsideDatasetError: ``name`` is absolute, or leads out (``..``, a link).
        MissingFileError: nothing is there.
    """
    base = root.resolve()
    target = (root / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(base) or target == base:
        raise PathOutsideDatasetError(f"{where}: {name!r} is outside the dataset folder")
    if not target.exists():
        raise MissingFileError(f"{where}: file {name!r} does not exist")
    return target


def read_labels_file(root: Path, labels_file: str) -> list[tuple[Path, str]]:
    """Rows of ``root/labels_file`` as (resolved file path, raw label).

    Every ``filename`` must name an existing file or folder inside ``root``; a path that
    escapes ``root`` (``../x``, an absolute path, a link out) is refused.
    """
    index = index_file(
        root,
        labels_file,
        described=f"labels file {labels_file!r}",
        hint="add a CSV with header `filename,label` or set `labels_file`",
    )
    with index.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        rows = list(reader)
    for needed in ("filename", "label"):
        if needed not in fields:
            raise MissingColumnError(
                f"labels file {labels_file!r} has no {needed!r} column; columns: {fields}"
            )
    out: list[tuple[Path, str]] = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "") for k, v in row.items() if k is not None}
        name = row["filename"].strip()
        if not name:
            raise DatasetError(f"labels file {labels_file!r} line {line} has no filename")
        target = inside_folder(root, name, where=f"labels file {labels_file!r} line {line}")
        out.append((target, row["label"]))
    if not out:
        raise EmptyDatasetError(f"labels file {labels_file!r} lists no files")
    return out
