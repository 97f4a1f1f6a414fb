"""The warm ClientApp runner: shim <-> runner protocol with real forks (no Flower, no torch).

The runner under test serves :func:`_target` (below) instead of the guarded ClientApp, in
a subprocess started from this module; the shim is the real generated ``flwr-clientapp``.
The runner runs whatever target it is given: nothing in it names the ClientApp.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from concord_protocol.processes import ManagedProcess, spawn
from site_node.federation.processes import SuperNodeProcess, supernode_exec_plan, write_runner_shim
from site_node.federation.warm.protocol import SOCKET_NAME, runner_socket_path
from site_node.federation.warm.runner import WarmRunner, _reseed, configure_logging, serve_site
from site_node.federation.warm.shim import RunnerUnavailableError, run_in_runner, shim_main

ROOT = Path(__file__).resolve().parents[4]


# --- the runner's target and entry point (run in the runner subprocess) -----------------


def _target(argv: list[str]) -> object:
    """A tiny "ClientApp": what it does is named by ``argv``."""
    command, *rest = argv
    if command == "exit":
        sys.exit(int(rest[0]))
    if command == "echo":
        print(rest[0], os.environ.get("WARM_TEST", "-"), os.getcwd(), sys.argv[0], flush=True)
        print("to-stderr", file=sys.stderr, flush=True)
        return 0
    if command == "raise":
        raise RuntimeError("boom")
    if command == "kill-self":
        os.kill(os.getpid(), int(rest[0]))
        time.sleep(10)
    if command == "wait-term":
        marker = Path(rest[0])

        def on_term(signum: int, _frame: object) -> None:
            marker.write_text(str(signum))
            sys.exit(7)

        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(60)
        return 1
    if command == "pid":
        Path(rest[0]).write_text(str(os.getpid()))
        time.sleep(60)
        return 1
    if command == "random":
        import numpy as np

        print(np.random.random(), flush=True)
        return 0
    return 99


def _serve(socket_path: str) -> None:
    configure_logging()
    WarmRunner(Path(socket_path), target=_target, preload=("numpy",)).serve()


def _serve_recorder(state_dir: str, record: str) -> None:
    """The site's runner (default socket under ``state_dir``) with a target that only
    writes the arguments it was given to ``record``."""

    def record_argv(argv: list[str]) -> int:
        Path(record).write_text(json.dumps([Path(sys.argv[0]).name, *argv]))
        return 0

    configure_logging()
    serve_site(Path(state_dir), record_argv, preload=())


# --- helpers ------------------------------------------------------------------------------


def _runner_cmd(sock: Path) -> list[str]:
    code = f"from tests.unit.site_node.federation.test_warm import _serve; _serve({str(sock)!r})"
    return [sys.executable, "-c", code]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _start_runner(sock: Path, log: Path, cmd: list[str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd or _runner_cmd(sock), cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT
        )
    _wait_for("the runner", lambda: "ready on" in log.read_text() or proc.poll() is not None)
    assert proc.poll() is None, log.read_text()
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Path]:
    """A runner serving :func:`_target`; yields its socket path."""
    sock = tmp_path / "state" / "supernode" / "runner" / SOCKET_NAME
    proc = _start_runner(sock, tmp_path / "runner.log")
    try:
        yield sock
    finally:
        _stop(proc)


@pytest.fixture
def shim(tmp_path: Path, runner: Path) -> Path:
    """The generated ``flwr-clientapp`` pointing at ``runner``."""
    return write_runner_shim(tmp_path / "bin", tmp_path / "state", runner)


def _run_shim(
    shim: Path, *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(shim), *args],
        cwd=cwd,
        env={**os.environ, "WARM_TEST": "from-the-shim"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- protocol -----------------------------------------------------------------------------


def test_socket_is_private_to_the_site_user(runner: Path) -> None:
    mode = runner.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(runner.parent.stat().st_mode) == 0o700
    assert runner == runner_socket_path(runner.parents[2])


def test_shim_is_small_and_names_the_guarded_runner(shim: Path) -> None:
    text = shim.read_text()
    assert text.startswith(f"#!{sys.executable}\n")
    assert "from site_node.federation.warm.shim import shim_main" in text
    assert "torch" not in text
    # The shim's module imports nothing heavy (it is what every message starts), nor the
    # guarded runner's module (only its in-process fallback does).
    code = (
        "import sys, site_node.federation.warm.shim; "
        "heavy = {'torch', 'numpy', 'flwr', 'grpc', 'tenseal', 'monai', 'opacus', 'pydantic'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}), "
        "'site_node.federation.processes' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[] False"


def test_worker_gets_the_shims_argv_env_cwd_and_stdio(shim: Path, tmp_path: Path) -> None:
    result = _run_shim(shim, "echo", "hello", cwd=tmp_path / "work")
    assert result.returncode == 0, result.stderr
    word, env, cwd, argv0 = result.stdout.split()
    assert (word, env) == ("hello", "from-the-shim")
    assert Path(cwd) == (tmp_path / "work").resolve()
    assert argv0 == str(shim)
    assert "to-stderr" in result.stderr
    assert "not reachable" not in result.stderr


def test_exit_status_passes_through(shim: Path, tmp_path: Path) -> None:
    assert _run_shim(shim, "exit", "0", cwd=tmp_path).returncode == 0
    assert _run_shim(shim, "exit", "3", cwd=tmp_path).returncode == 3
    failed = _run_shim(shim, "raise", cwd=tmp_path)
    assert failed.returncode == 1
    assert "RuntimeError: boom" in failed.stderr
    # A worker killed by a signal: the shim dies by the same signal.
    killed = _run_shim(shim, "kill-self", str(int(signal.SIGKILL)), cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL


def test_sigterm_to_the_shim_reaches_the_worker(shim: Path, tmp_path: Path) -> None:
    marker = tmp_path / "term"
    proc = subprocess.Popen(
        [str(shim), "wait-term", str(marker)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 7  # the worker's handler ran and chose the status
        assert marker.read_text() == str(int(signal.SIGTERM))
    finally:
        proc.kill()
        proc.wait()


def test_killed_shim_takes_its_worker_along(shim: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    proc = subprocess.Popen([str(shim), "pid", str(pid_file)], cwd=tmp_path)
    try:
        _wait_for("the worker", lambda: pid_file.exists() and pid_file.read_text() != "")
        worker = int(pid_file.read_text())
        assert worker != proc.pid
        proc.kill()
        proc.wait(10)
        _wait_for("the worker to be killed", lambda: _gone(worker), timeout=10)
    finally:
        proc.kill()
        proc.wait()


def test_workers_get_fresh_randomness_and_run_side_by_side(shim: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([str(shim), "random"], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        for _ in range(3)
    ]
    values = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(values)) == 3, values


def test_torch_is_reseeded_in_a_worker() -> None:
    torch = pytest.importorskip("torch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        _reseed()
        first = torch.rand(4)
        torch.manual_seed(1)
        _reseed()
        second = torch.rand(4)
    assert not torch.equal(first, second)


def test_runner_survives_bad_clients(runner: Path, shim: Path, tmp_path: Path) -> None:
    # A client that connects and leaves, and one that sends garbage.
    for payload in (b"", b"\0\0\0\x05hello"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(runner))
            client.settimeout(10)
            assert client.recv(64)  # hello
            if payload:
                socket.send_fds(client, [b"\0"], [])
                client.sendall(payload)
                assert client.recv(64) == b""  # refused: closed without starting anything
    assert _run_shim(shim, "exit", "5", cwd=tmp_path).returncode == 5


def test_site_runner_serves_the_target_it_is_given(tmp_path: Path) -> None:
    state, record = tmp_path / "state", tmp_path / "argv.json"
    code = (
        "from tests.unit.site_node.federation.test_warm import _serve_recorder; "
        f"_serve_recorder({str(state)!r}, {str(record)!r})"
    )
    proc = _start_runner(
        runner_socket_path(state), tmp_path / "runner.log", [sys.executable, "-c", code]
    )
    try:
        shim = write_runner_shim(tmp_path / "bin", state)  # the state dir's default socket
        result = _run_shim(shim, "--runtime-api-address", "127.0.0.1:1", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "not reachable" not in result.stderr  # served by the runner, not in-process
        assert json.loads(record.read_text()) == [
            "flwr-clientapp",
            "--runtime-api-address",
            "127.0.0.1:1",
        ]
    finally:
        _stop(proc)


# --- fallback, start-up and lifetime ------------------------------------------------------


def test_fallback_runs_in_process_when_the_socket_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []

    def fallback(argv: list[str]) -> int:
        seen.append(argv)
        return 4

    missing = tmp_path / "nowhere" / SOCKET_NAME
    code = shim_main(tmp_path, missing, ["--token", "x"], fallback=fallback)
    assert code == 4
    assert seen == [["--token", "x"]]
    assert "not reachable" in capsys.readouterr().err


def test_generated_shim_falls_back_to_the_guarded_runner(tmp_path: Path) -> None:
    shim = write_runner_shim(tmp_path / "bin", tmp_path / "state")  # no runner listens
    result = _run_shim(shim, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "running in-process" in result.stderr
    assert "--runtime-api-address" in result.stdout  # Flower's flwr-clientapp parser


def test_stale_socket_is_replaced_and_a_second_runner_refused(tmp_path: Path) -> None:
    sock = tmp_path / "r" / SOCKET_NAME
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    proc = _start_runner(sock, tmp_path / "runner.log")
    try:
        second = WarmRunner(sock, target=_target)
        with pytest.raises(RuntimeError, match="already listens"):
            second._bind()
    finally:
        _stop(proc)
    assert not sock.exists()  # removed on a clean stop


def test_runner_refuses_a_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RuntimeError, match="not be writable by others"):
        WarmRunner(shared / SOCKET_NAME, target=_target)._bind()


def test_shim_does_not_talk_to_another_users_runner(
    runner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the shim ran as another user than the runner (root may connect to any socket).
    monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 4242)
    with pytest.raises(RunnerUnavailableError, match="belongs to uid") as refused:
        run_in_runner(runner, ["exit", "0"])
    assert refused.value.code == "runner.unavailable"
    calls: list[list[str]] = []

    def fallback(argv: list[str]) -> int:
        calls.append(argv)
        return 0

    assert shim_main(tmp_path, runner, ["x"], fallback=fallback) == 0
    assert calls == [["x"]]  # ran in-process; nothing went to the runner


def test_long_socket_paths_work(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    sock = deep / SOCKET_NAME
    assert len(str(sock)) > 108
    proc = _start_runner(sock, tmp_path / "runner.log")
    try:
        shim = write_runner_shim(tmp_path / "bin", tmp_path / "state", sock)
        assert _run_shim(shim, "exit", "6", cwd=tmp_path).returncode == 6
    finally:
        _stop(proc)


def test_runner_exits_with_its_parent(tmp_path: Path) -> None:
    sock = tmp_path / "r" / SOCKET_NAME
    log = tmp_path / "runner.log"
    parent_code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen({_runner_cmd(sock)!r}, stdout=open({str(log)!r}, 'wb'), "
        "stderr=subprocess.STDOUT); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT, env=_env())
    try:
        _wait_for("the runner", lambda: log.exists() and "ready on" in log.read_text())
        parent.kill()
        parent.wait(10)
        _wait_for("the runner to exit", lambda: "parent" in log.read_text(), timeout=15)
        _wait_for("the socket to go", lambda: not sock.exists(), timeout=15)
    finally:
        parent.kill()
        parent.wait()


def test_supernode_handle_stops_the_runner_too(tmp_path: Path) -> None:
    def sleeper(name: str) -> ManagedProcess:
        return spawn(
            name,
            [sys.executable, "-c", "import time; time.sleep(60)"],
            env=dict(os.environ),
            log_path=tmp_path / f"{name}.log",
        )

    node, runner = sleeper("node"), sleeper("runner")
    handle = SuperNodeProcess(node.name, node.proc, node.log_path, node._log, runner=runner)
    assert handle.alive()
    assert runner.alive()
    handle.stop(timeout=5)
    assert not handle.alive()
    assert not runner.alive()


def test_container_plan_puts_the_shim_first_on_path(tmp_path: Path) -> None:
    argv, env = supernode_exec_plan(
        tmp_path / "state", ["--superlink", "x:1"], environ={"PATH": "/usr/bin", "A": "b"}
    )
    assert argv[:3] == [sys.executable, "-m", "site_node.federation.supernode_main"]
    secret = tmp_path / "state" / "supernode" / "superexec.secret"
    assert argv[3:] == [
        "--superlink",
        "x:1",
        "--isolation",
        "process",  # the site's executor starts the apps, not Flower's SuperExec
        "--superexec-auth-secret-file",
        str(secret),
    ]
    assert secret.stat().st_mode & 0o777 == 0o600
    bin_dir = tmp_path / "state" / "supernode" / "bin"
    assert env["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin"]
    assert env["A"] == "b"
    assert (bin_dir / "flwr-clientapp").read_text().count(
        str(runner_socket_path(tmp_path / "state"))
    ) == 1


def test_site_node_supernode_writes_the_shim_and_becomes_flower_supernode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "site-node"),
            "supernode",
            "--state-dir",
            str(state),
            "--no-warm",
            "--",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: flower-supernode" in result.stdout
    shim = state / "supernode" / "bin" / "flwr-clientapp"
    assert "shim_main" in shim.read_text()
    assert not runner_socket_path(state).exists()  # --no-warm: no runner started
