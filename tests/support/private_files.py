"""Checks for code that writes secrets: under umask 0 and with every chmod forbidden, the
files it writes must still come out with mode 0600 (so they never had a wider one)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

__all__ = ["mode_of", "strict_private_writes"]


@contextmanager
def strict_private_writes() -> Iterator[None]:
    """umask 0 (a file gets exactly the mode it is created with) and no chmod at all (a
    writer that creates wide and narrows afterwards fails here)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"chmod after writing: {args}")

    old = os.umask(0)
    try:
        with (
            mock.patch.object(os, "chmod", refuse),
            mock.patch.object(os, "fchmod", refuse),
            mock.patch.object(Path, "chmod", refuse),
        ):
            yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)
