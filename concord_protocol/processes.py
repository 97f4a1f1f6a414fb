"""Starting Flower processes the way both roles must: never ``uv sync``, logs to a file.

Every Flower process Concord starts (the consortium's SuperLink and ``flwr`` CLI calls, a
site's SuperNode and its ClientApp runner) gets :data:`FLOWER_ENV`: no telemetry, no
update check, and no runtime dependency installation (Flower's default runs ``uv sync``,
which ignores pip's settings and can pull a multi-GB CUDA torch). :func:`spawn` starts a
child in its own process group with its output in a log file; :class:`ManagedProcess`
stops the whole group. Nothing here reads ``os.environ`` except to pass ``PATH`` on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "FLOWER_ENV",
    "FlowerProcessError",
    "ManagedProcess",
    "flower_env",
    "flwr_binary",
    "spawn",
    "wait_for_port",
]

#: Environment for every Flower process we start.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class FlowerProcessError(RuntimeError):
    """A Flower process or CLI call failed; ``detail`` holds the tail of its output."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message if not detail else f"{message}\n{detail[-2000:]}")
        self.detail = detail


def flwr_binary(name: str) -> str:
    """Path of a Flower console script next to this interpreter (the installed venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FlowerProcessError(f"{name} not found")
    return found


def flower_env(flwr_home: Path, *, path_prefix: Path | None = None) -> dict[str, str]:
    """Environment of a Flower process: ``FLOWER_ENV``, its own ``FLWR_HOME``, a ``PATH``
    starting with the venv's bin (and ``path_prefix`` before it, if given)."""
    parts = [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
    if path_prefix is not None:
        parts.insert(0, str(path_prefix))
    env = {
        "PATH": os.pathsep.join(parts),
        "HOME": str(flwr_home),
        "FLWR_HOME": str(flwr_home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        **FLOWER_ENV,
    }
    return env


def wait_for_port(host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``host:port`` accepts TCP connections (or the process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerProcessError(f"{host}:{port} did not open within {timeout:.0f}s")


@dataclass
class ManagedProcess:
    """A child process with its log file; :meth:`stop` terminates it (then kills)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the process log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the process group (SIGTERM, then SIGKILL); return the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def spawn(name: str, args: list[str], *, env: dict[str, str], log_path: Path) -> ManagedProcess:
    """Start ``args`` in its own process group, output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = log_path.open("wb")
    proc = subprocess.Popen(
        args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    return ManagedProcess(name, proc, log_path, handle)
