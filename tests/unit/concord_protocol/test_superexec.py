"""Concord's SuperExec pieces: the app list pinned against Flower, deny stubs, the secret file."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from concord_protocol.superexec import (
    FLOWER_APP_COMMANDS,
    STUB_EXIT_CODE,
    ExecutorError,
    add_executor_args,
    config_from_args,
    ensure_secret_file,
    load_secret,
    write_deny_stubs,
)


def test_the_app_commands_are_flowers_own_map() -> None:
    """Fails loudly when Flower adds, renames or remaps an app kind: every kind must get a
    deny stub, and the executors must know it."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    assert {str(k): v for k, v in TASK_TYPE_TO_COMMAND.items()} == dict(FLOWER_APP_COMMANDS)
    assert {str(t) for t in TaskType} == set(FLOWER_APP_COMMANDS)


def test_deny_stubs_cover_every_other_app_and_the_stock_superexec(tmp_path: Path) -> None:
    stubs = write_deny_stubs(tmp_path, allowed=frozenset({"flwr-clientapp"}))
    names = {p.name for p in stubs}
    assert names == (set(FLOWER_APP_COMMANDS.values()) - {"flwr-clientapp"}) | {"flower-superexec"}
    assert not (tmp_path / "flwr-clientapp").exists()


def test_a_deny_stub_runs_nothing_and_says_why(tmp_path: Path) -> None:
    write_deny_stubs(tmp_path)
    stub = tmp_path / "flwr-agentapp"
    assert stub.read_text().startswith("#!/bin/sh\n")  # no interpreter that imports anything
    done = subprocess.run(
        [str(stub), "--runtime-api-address", "127.0.0.1:1", "--token", "x"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == STUB_EXIT_CODE
    assert "flwr-agentapp is not allowed here" in done.stderr


def test_the_secret_file_is_born_private(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask cannot widen it
    try:
        path = ensure_secret_file(tmp_path / "dir" / "superexec.secret")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    secret = load_secret(path)
    assert len(secret) == 64
    assert ensure_secret_file(path) == path  # kept, never replaced
    assert load_secret(path) == secret


def test_a_world_readable_or_empty_secret_is_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.write_bytes(b"s" * 32)
    loose.chmod(0o644)
    with pytest.raises(ExecutorError) as exc:
        load_secret(loose)
    assert exc.value.code == "superexec.secret_insecure"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    empty.chmod(0o600)
    with pytest.raises(ExecutorError) as exc:
        load_secret(empty)
    assert exc.value.code == "superexec.secret_empty"
    with pytest.raises(ExecutorError) as exc:
        load_secret(tmp_path / "missing")
    assert exc.value.code == "superexec.secret_unreadable"


def test_the_executor_runs_a_program_by_absolute_path_only(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_executor_args(parser)
    args = parser.parse_args(
        [
            "--runtime-api-address",
            "127.0.0.1:9094",
            "--superexec-auth-secret-file",
            str(tmp_path / "s"),
            "--insecure",
        ]
    )
    with pytest.raises(ExecutorError):
        config_from_args(args, task_type="flwr-clientapp", command=["flwr-clientapp"])
    config = config_from_args(args, task_type="flwr-clientapp", command=["/bin/true"])
    assert config.root_certificates is None
    assert config.task_type == "flwr-clientapp"
