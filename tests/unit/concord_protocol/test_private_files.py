"""write_private_file: a secret file exists only with mode 0600, from its first byte on, even
with umask 0; it is moved into place atomically and never chmod-ed afterwards."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from concord_protocol import private_files
from concord_protocol.private_files import write_private_file


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask: whatever the code asks for is what the file gets."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any chmod while the test runs fails it: there must be nothing to narrow."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"chmod called: {args}")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_file_has_mode_0600_at_every_moment(
    tmp_path: Path, umask_zero: None, no_chmod: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_write = os.write

    def watching_write(fd: int, data: Any) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))  # the mode while the secret lands
        return real_write(fd, data)

    monkeypatch.setattr(private_files.os, "write", watching_write)
    target = tmp_path / "keys" / "secret.pem"
    write_private_file(target, b"secret bytes" * 1000)
    assert seen
    assert set(seen) == {0o600}
    assert _mode(target) == 0o600
    assert target.read_bytes() == b"secret bytes" * 1000
    assert _mode(target.parent) == 0o700  # a folder it creates is private too
    assert [p.name for p in target.parent.iterdir()] == ["secret.pem"]  # no temp file left


def test_every_file_it_creates_is_new_and_0600(
    tmp_path: Path, umask_zero: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            calls.append((flags, mode))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(private_files.os, "open", recording_open)
    write_private_file(tmp_path / "token", b"t")
    write_private_file(tmp_path / "key", b"k", overwrite=False)
    assert calls
    for flags, mode in calls:
        assert flags & os.O_EXCL  # never an existing file (or a planted link)
        assert mode == 0o600


def test_overwriting_replaces_a_wider_file_atomically(tmp_path: Path, umask_zero: None) -> None:
    target = tmp_path / "study.ctx"
    target.write_bytes(b"old")
    target.chmod(0o644)
    before = target.stat().st_ino
    write_private_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600  # a new file, not the old one re-opened
    assert target.stat().st_ino != before


def test_without_overwrite_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "signing_key.pem"
    write_private_file(target, b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        write_private_file(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing_key.pem"]


def test_without_hard_links_the_exclusive_create_is_still_0600(
    tmp_path: Path, umask_zero: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("no hard links on this filesystem")

    monkeypatch.setattr(private_files.os, "link", no_links)
    target = tmp_path / "issuer.pem"
    write_private_file(target, b"key", overwrite=False)
    assert _mode(target) == 0o600
    assert target.read_bytes() == b"key"
    with pytest.raises(FileExistsError):
        write_private_file(target, b"other", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["issuer.pem"]


def test_a_failed_write_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(private_files.os, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_private_file(tmp_path / "token", b"t")
    assert list(tmp_path.iterdir()) == []
