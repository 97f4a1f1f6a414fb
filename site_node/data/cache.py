"""Loaded, preprocessed records kept between loads, within a byte bound.

Why: the ClientApp loads the study's datasets for every message (train and evaluate, every
round), and reading and resampling NIfTI or DICOM volumes costs far more than a round's
training of a small network. A record's preprocessed arrays depend only on its files and
on how they were processed, so they are cached under a key of both:

* the files: each one's resolved path, modification time (ns) and size (a DICOM series
  folder: every file in it), so an edited, replaced or added file is a new key;
* the recipe: the loader and its version, the contract's preprocessing digest
  (:meth:`concord_protocol.preprocessing.PreprocessingSpec.digest`) and whatever else
  shaped the arrays (``image_size``, the declared labels), so two studies that preprocess
  differently never share a record.

Two tiers, each bounded in bytes, least recently used out first:

* memory (``max_bytes``): this process only. An in-process federation (the simulation,
  ``consortium demo``'s site processes) reuses it across rounds;
* a directory (``directory``, ``directory_max_bytes``; off unless configured): a real
  SuperNode starts a fresh ClientApp process per message, so only files outlive a
  message. Files are ``.npz`` arrays read back without pickle, written atomically with
  mode 0600 in a 0700 folder: they are derived patient data and stay at the site like it.

A record larger than a tier's bound is not kept in it. Nothing here is sent anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CacheStats", "RecordCache", "file_fingerprint", "shared_cache"]

Arrays = tuple[npt.NDArray[Any], ...]

#: Default bound of the memory tier (the ``data_cache_max_bytes`` site setting).
DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CacheStats:
    """Counts since the cache was made: what a test (or an operator) checks."""

    hits: int
    disk_hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int


def file_fingerprint(paths: Sequence[Path]) -> list[list[object]]:
    """Resolved path, mtime (ns) and size of each file (a folder: of each file in it)."""
    out: list[list[object]] = []
    for path in paths:
        resolved = path.resolve()
        members = sorted(p for p in resolved.iterdir() if p.is_file()) if path.is_dir() else []
        for item in [resolved, *members]:
            stat = item.stat()
            out.append([str(item), stat.st_mtime_ns, stat.st_size])
    return out


class RecordCache:
    """An LRU of records (tuples of numpy arrays) by key, within ``max_bytes`` in memory and
    optionally ``directory_max_bytes`` in ``directory`` (see the module docstring)."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        directory: Path | None = None,
        directory_max_bytes: int = 0,
    ) -> None:
        if max_bytes < 0 or directory_max_bytes < 0:
            raise ValueError("cache bounds must be >= 0")
        self.max_bytes = max_bytes
        self.directory = directory
        self.directory_max_bytes = directory_max_bytes if directory is not None else 0
        self._entries: OrderedDict[str, Arrays] = OrderedDict()
        self._bytes = 0
        self._hits = self._disk_hits = self._misses = self._evictions = 0

    @property
    def stats(self) -> CacheStats:
        """Hits, misses, entries and bytes held in memory."""
        return CacheStats(
            self._hits,
            self._disk_hits,
            self._misses,
            len(self._entries),
            self._bytes,
            self._evictions,
        )

    @staticmethod
    def key(files: Sequence[Path], recipe: Mapping[str, object]) -> str:
        """The key of the record read from ``files`` as ``recipe`` says (see the module
        docstring)."""
        blob = json.dumps(
            {"files": file_fingerprint(files), "recipe": dict(recipe)},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_or_load(
        self, files: Sequence[Path], recipe: Mapping[str, object], load: Callable[[], Arrays]
    ) -> Arrays:
        """The cached record of ``files`` and ``recipe``, else ``load()`` kept for next time."""
        key = self.key(files, recipe)
        found = self.get(key)
        if found is not None:
            return found
        arrays = load()
        self.put(key, arrays)
        return arrays

    def get(self, key: str) -> Arrays | None:
        """The record under ``key`` (memory first, then the directory), or None."""
        arrays = self._entries.get(key)
        if arrays is not None:
            self._entries.move_to_end(key)
            self._hits += 1
            return arrays
        arrays = self._read_file(key)
        if arrays is not None:
            self._disk_hits += 1
            self._remember(key, arrays)
            return arrays
        self._misses += 1
        return None

    def put(self, key: str, arrays: Arrays) -> None:
        """Keep ``arrays`` under ``key`` in each tier whose bound it fits."""
        frozen = tuple(_read_only(a) for a in arrays)
        self._remember(key, frozen)
        self._write_file(key, frozen)

    # -- memory ----------------------------------------------------------------------------

    def _remember(self, key: str, arrays: Arrays) -> None:
        size = sum(int(a.nbytes) for a in arrays)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= sum(int(a.nbytes) for a in old)
        while self._entries and self._bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= sum(int(a.nbytes) for a in evicted)
            self._evictions += 1
        self._entries[key] = arrays
        self._bytes += size

    # -- directory -------------------------------------------------------------------------

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.npz"

    def _read_file(self, key: str) -> Arrays | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = tuple(_read_only(data[f"arr_{i}"]) for i in range(len(data.files)))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # damaged: read the files again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return arrays

    def _write_file(self, key: str, arrays: Arrays) -> None:
        path = self._path(key)
        size = sum(int(a.nbytes) for a in arrays)
        if path is None or size > self.directory_max_bytes:
            return
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, *arrays)  # stored as arr_0, arr_1, ...
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return  # a full disk costs a re-read, never a round
        self._trim_directory(folder)

    def _trim_directory(self, folder: Path) -> None:
        files = []
        for item in folder.glob("*.npz"):
            with contextlib.suppress(OSError):
                stat = item.stat()
                files.append((stat.st_mtime_ns, stat.st_size, item))
        total = sum(size for _, size, _ in files)
        for _, size, item in sorted(files):
            if total <= self.directory_max_bytes:
                break
            item.unlink(missing_ok=True)
            total -= size
            self._evictions += 1


def _read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A contiguous copy nobody can write to (a cached record is shared by every load)."""
    out = np.ascontiguousarray(array).copy()
    out.setflags(write=False)
    return out


_shared: RecordCache | None = None


def shared_cache(
    max_bytes: int, *, directory: Path | None = None, directory_max_bytes: int = 0
) -> RecordCache:
    """This process's cache with these bounds (the first call, or a call with other bounds,
    makes a new one): the ClientApp's datasets are loaded through it every message."""
    global _shared
    current = _shared
    if current is None or (current.max_bytes, current.directory, current.directory_max_bytes) != (
        max_bytes,
        directory,
        directory_max_bytes if directory is not None else 0,
    ):
        current = _shared = RecordCache(
            max_bytes, directory=directory, directory_max_bytes=directory_max_bytes
        )
    return current
