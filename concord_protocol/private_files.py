"""Files that hold secrets (private keys, tokens, study keys): born with mode 0600.

Writing a file and then ``chmod``-ing it leaves a moment in which the file exists with the
mode the umask allowed (often 0644): anyone on the machine who opens it then keeps the
open descriptor, and the secret, after the ``chmod``. :func:`write_private_file` has no
such moment, whatever the umask:

* the bytes go to a new temporary file next to the target, created by
  ``os.open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600)``: a file that did not
  exist before (``O_EXCL``, so never an attacker's file or link), whose mode is ``0o600``
  narrowed by the umask, never widened;
* it is flushed to disk, then moved into place atomically (``os.replace``), or, when the
  target must not be overwritten, hard-linked into place (``os.link`` fails if the target
  exists), so readers see the old file or the whole new one, never a part;
* nothing calls ``chmod`` afterwards: there is nothing to narrow.

A directory the function creates gets mode 0700. Both roles use it (the server's tree-head
key, federation token, local issuer key and development TLS key; the site's signing,
exchange and SuperNode keys and its study keys), so it lives here, in the shared package.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["PRIVATE_FILE_MODE", "write_private_file"]

#: The mode every private file is created with (before the umask, which can only narrow it).
PRIVATE_FILE_MODE = 0o600

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_private_file(path: Path | str, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` as a new file of mode 0600 (see the module); return ``path``.

    ``overwrite`` false: raise :class:`FileExistsError` if ``path`` exists (keys are never
    replaced by accident), also when another process creates it concurrently. On a
    filesystem without hard links the exclusive create is done in place (``O_EXCL``, mode
    0600 from the start), which still never overwrites and never widens the mode.
    """
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, _CREATE_FLAGS, PRIVATE_FILE_MODE)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(temporary, target)
        else:
            try:
                os.link(temporary, target)
            except FileExistsError:
                raise
            except OSError:  # no hard links here: exclusive create in place
                fd = os.open(target, _CREATE_FLAGS, PRIVATE_FILE_MODE)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _fsync_dir(target.parent)
    return target
