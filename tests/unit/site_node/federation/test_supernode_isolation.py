"""``site-node supernode`` starts nothing but the guarded ClientApp: process isolation, a
SuperExec secret file, deny stubs, a loopback runtime API (no processes started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from concord_protocol.superexec import FLOWER_APP_COMMANDS
from site_node.federation.executor import TASK_TYPE, shim_path
from site_node.federation.processes import (
    SuperNodeArgsError,
    supernode_args_plan,
    write_runner_shim,
)


def test_flower_names_the_plan_relies_on_still_exist() -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    parsed = _parse_args_run_supernode().parse_args(["--superlink", "x:1"])
    assert parsed.isolation == "subprocess"  # Flower's default: why the plan adds process
    assert parsed.host == "127.0.0.1"
    assert parsed.superexec_auth_secret_file is None


def test_the_plan_adds_process_isolation_and_a_private_secret(tmp_path: Path) -> None:
    plan = supernode_args_plan(tmp_path, ["--superlink", "x:1", "--port", "9100"])
    secret = tmp_path / "supernode" / "superexec.secret"
    assert plan.supernode_args == [
        "--superlink",
        "x:1",
        "--port",
        "9100",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
    ]
    assert secret.stat().st_mode & 0o777 == 0o600
    assert plan.executor_argv is not None
    argv = plan.executor_argv
    assert argv[argv.index("--runtime-api-address") + 1] == "127.0.0.1:9100"
    assert argv[argv.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert "--insecure" in argv
    assert secret.read_text() not in " ".join(argv)  # the path travels, never the secret


def test_a_given_secret_file_and_runtime_tls_are_used(tmp_path: Path) -> None:
    secret = tmp_path / "mounted.secret"
    secret.write_bytes(b"x" * 32)
    secret.chmod(0o400)
    plan = supernode_args_plan(
        tmp_path,
        [
            "--superlink=x:1",
            "--isolation=process",
            f"--superexec-auth-secret-file={secret}",
            "--ssl-certfile",
            "c.pem",
            "--ssl-keyfile",
            "k.pem",
            "--ssl-ca-certfile",
            "ca.pem",
        ],
    )
    assert plan.executor_argv is not None
    assert str(secret) in plan.executor_argv
    assert plan.executor_argv[plan.executor_argv.index("--root-certificates") + 1] == "ca.pem"


@pytest.mark.parametrize(
    "args",
    [
        ["--isolation", "subprocess"],
        ["--isolation=subprocess"],
        ["--host", "0.0.0.0"],
        ["--host=10.0.0.5"],
    ],
)
def test_the_plan_refuses_what_would_let_flower_start_apps_or_expose_the_runtime_api(
    tmp_path: Path, args: list[str]
) -> None:
    with pytest.raises(SuperNodeArgsError) as exc:
        supernode_args_plan(tmp_path, ["--superlink", "x:1", *args])
    assert exc.value.code == "supernode.unsafe_args"


def test_help_passes_through_untouched(tmp_path: Path) -> None:
    plan = supernode_args_plan(tmp_path, ["--help"])
    assert plan.supernode_args == ["--help"]
    assert plan.executor_argv is None


def test_the_shim_dir_denies_every_other_flower_app(tmp_path: Path) -> None:
    bin_dir = tmp_path / "state" / "supernode" / "bin"
    shim = write_runner_shim(bin_dir, tmp_path / "state")
    assert shim == shim_path(tmp_path / "state")
    assert TASK_TYPE == "flwr-clientapp"
    for command in set(FLOWER_APP_COMMANDS.values()) - {"flwr-clientapp"}:
        assert "Concord deny stub" in (bin_dir / command).read_text()
    assert "Concord deny stub" in (bin_dir / "flower-superexec").read_text()
    assert "shim_main" in shim.read_text()
