"""Concord's SuperExec: the one process that may start Flower apps, and only one kind.

Why it exists. In Flower 1.41 an app process (ServerApp, ClientApp, AgentApp, ...) is
started by a *SuperExec*: it polls the Runtime API's ``acquire-task`` route, receives a
task and its token, and starts the program that Flower maps to the task's type
(``TASK_TYPE_TO_COMMAND``: ``flwr-serverapp``, ``flwr-clientapp``, ``flwr-agentapp``,
``flwr-simulation``, ``flwr-model``, ``flwr-connector``), found by name on ``PATH``. The
stock ``flower-superexec`` has three properties Concord cannot accept:

* it acquires **every** task type (``AutoExecPlugin.supported_task_types`` is all of
  ``TaskType``), so a run whose bundle names an AgentApp makes a SuperNode start
  ``flwr-agentapp``, which installs the bundle and imports its code;
* it hands the task token to the app as ``--token TOKEN``, readable by every local user
  in ``/proc/<pid>/cmdline``;
* started by ``flower-supernode``/``flower-superlink`` in ``--isolation subprocess`` it
  gets no SuperExec secret, so ``acquire-task`` is open to any process that reaches the
  Runtime API (anyone in the pod's network namespace could take ClientApp tasks).

:func:`run_executor` replaces it. It runs next to a SuperNode or SuperLink started with
``--isolation process --superexec-auth-secret-file F`` (then Flower starts no SuperExec of
its own and ``acquire-task`` requires an HMAC over the request made with the secret in
``F``: Flower's ``SuperExecAuthHttpInterceptor``), and:

* asks for exactly **one** task type (the site: ``flwr-clientapp``; the SuperLink:
  ``flwr-serverapp``); a task of any other type is never acquired, so nothing is installed,
  imported or started for it (it expires on Flower's side);
* launches one fixed program (the role's guarded app, by absolute path, never looked up on
  ``PATH``) with ``--token-file`` naming a file of mode 0600 in a private directory (mode
  0700), never ``--token``: the token is in no process's arguments or environment. The
  guarded apps delete the file once they read it; the executor deletes what is left when the
  app exits;
* reads the secret from a file only (never argv, never an environment value):
  :func:`ensure_secret_file` creates one with mode 0600 from the start
  (:func:`~concord_protocol.private_files.write_private_file`).

:func:`write_deny_stubs` is the second line: for every Flower app command other than the
allowed one (and ``flower-superexec``) it writes a ``/bin/sh`` script that prints why and
exits 126, first on the ``PATH`` of the SuperNode/SuperLink and everything they start. A
Flower code path that would start an app by name (say ``--isolation subprocess`` set by
mistake) then starts a script that imports nothing. :data:`FLOWER_APP_COMMANDS` must equal
Flower's own map; ``tests/unit/concord_protocol/test_superexec.py`` pins it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from concord_protocol.errors import ConcordError
from concord_protocol.private_files import write_private_file

__all__ = [
    "ACQUIRE_TASK_METHOD",
    "FLOWER_APP_COMMANDS",
    "STUB_EXIT_CODE",
    "ExecutorConfig",
    "ExecutorError",
    "IsolatedArgs",
    "IsolationRefusedError",
    "add_executor_args",
    "config_from_args",
    "configure_logging",
    "ensure_secret_file",
    "isolated_args",
    "load_secret",
    "run_executor",
    "write_deny_stubs",
]

log = logging.getLogger("concord.superexec")

#: The one Runtime API method Flower protects with the SuperExec secret.
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"
#: Flower 1.41's task types and the program each starts (``TASK_TYPE_TO_COMMAND``).
FLOWER_APP_COMMANDS: Mapping[str, str] = {
    "flwr-serverapp": "flwr-serverapp",
    "flwr-clientapp": "flwr-clientapp",
    "flwr-simulation": "flwr-simulation",
    "flwr-agentapp": "flwr-agentapp",
    "flwr-model": "flwr-model",
    "flwr-connector": "flwr-connector",
}
#: Programs besides the apps that a deny stub also shadows: the stock SuperExec, which
#: ``--isolation subprocess`` would start.
EXTRA_DENIED_COMMANDS = ("flower-superexec",)
#: Exit status of a deny stub ("command found but not executable", as a shell reports).
STUB_EXIT_CODE = 126
#: Bytes of randomness in a secret that :func:`ensure_secret_file` creates.
SECRET_BYTES = 32


class ExecutorError(ConcordError):
    """The executor cannot start: its secret file or its configuration is unusable."""

    code = "superexec.misconfigured"


# --- the secret ------------------------------------------------------------------------


def ensure_secret_file(path: Path) -> Path:
    """The SuperExec secret file at ``path``: created (mode 0600 from the start, 32 random
    bytes as hex) if missing, else checked (non-empty, not readable by others). Only its
    path is ever passed on, never its content."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process created it meanwhile
            write_private_file(path, os.urandom(SECRET_BYTES).hex().encode(), overwrite=False)
    load_secret(path)
    return path


def load_secret(path: Path) -> bytes:
    """The secret's exact bytes (Flower reads the file raw). Raises :class:`ExecutorError`
    for a missing, empty or world-readable file."""
    try:
        mode = path.stat().st_mode
        secret = path.read_bytes()
    except OSError as exc:
        raise ExecutorError(
            f"cannot read the SuperExec secret file {path}: {exc.strerror}",
            code="superexec.secret_unreadable",
        ) from None
    if mode & 0o004:
        raise ExecutorError(
            f"the SuperExec secret file {path} is readable by every user",
            code="superexec.secret_insecure",
            hint="Create it with mode 0600 (or mount it from a Secret with defaultMode 0400).",
        )
    if not secret:
        raise ExecutorError(
            f"the SuperExec secret file {path} is empty", code="superexec.secret_empty"
        )
    return secret


# --- the SuperNode's / SuperLink's own arguments ----------------------------------------

#: Host names that keep a Runtime API on this machine.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class IsolationRefusedError(ExecutorError):
    """Arguments that would let Flower start apps itself (``option`` ``isolation``) or
    expose the Runtime API beyond this machine (``option`` ``host``); callers say why in
    their role's words."""

    code = "superexec.isolation_refused"

    def __init__(self, option: str, value: str) -> None:
        super().__init__(f"--{option} {value} is refused")
        self.option = option
        self.value = value


#: Seconds between two ``acquire-task`` calls while no task waits: how long a message
#: waits, at most, before its app is started (one loopback request each).
DEFAULT_POLL_S = 0.1


@dataclass(frozen=True)
class IsolatedArgs:
    """Flower's arguments completed for Concord's executor, and Flower's parse of them."""

    args: list[str]
    parsed: argparse.Namespace
    secret_file: Path


def isolated_args(
    parser: argparse.ArgumentParser, flower_args: Sequence[str], *, default_secret: Path
) -> IsolatedArgs:
    """Check and complete ``flower-supernode``/``flower-superlink`` arguments, parsed with
    Flower's own ``parser`` (so every spelling Flower accepts is seen): ``--isolation
    process`` is added when absent and any other isolation refused; the Runtime API's
    ``--host`` must be loopback; ``--superexec-auth-secret-file`` defaults to
    ``default_secret`` (created 0600 if missing). Raises :class:`IsolationRefusedError`."""
    parser.set_defaults(isolation=None)
    parsed = parser.parse_args(list(flower_args))
    args = list(flower_args)
    if parsed.isolation is None:
        args += ["--isolation", "process"]
    elif parsed.isolation != "process":
        raise IsolationRefusedError("isolation", str(parsed.isolation))
    if str(parsed.host) not in LOOPBACK_HOSTS:
        raise IsolationRefusedError("host", str(parsed.host))
    if parsed.superexec_auth_secret_file is None:
        secret = ensure_secret_file(default_secret)
        args += ["--superexec-auth-secret-file", str(secret)]
    else:
        secret = ensure_secret_file(Path(parsed.superexec_auth_secret_file))
    return IsolatedArgs(args, parsed, secret)


# --- deny stubs --------------------------------------------------------------------------


def write_deny_stubs(bin_dir: Path, *, allowed: frozenset[str] = frozenset()) -> list[Path]:
    """Write a deny stub into ``bin_dir`` for every Flower app command not in ``allowed``,
    and for ``flower-superexec``; the stubs' paths. A stub is ``/bin/sh``: it imports and
    installs nothing, prints one line to stderr and exits :data:`STUB_EXIT_CODE`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted({*FLOWER_APP_COMMANDS.values(), *EXTRA_DENIED_COMMANDS} - allowed):
        stub = bin_dir / name
        stub.write_text(
            "#!/bin/sh\n"
            "# Concord deny stub (generated): this Flower program may not run here.\n"
            f'echo "concord: {name} is not allowed here; nothing was installed or run" >&2\n'
            f"exit {STUB_EXIT_CODE}\n"
        )
        stub.chmod(0o755)
        written.append(stub)
    return written


# --- the executor ------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutorConfig:
    """What one executor does: which task type it takes and which program it starts."""

    #: ``host:port`` of the Runtime API (the SuperNode's or the SuperLink's, on loopback).
    runtime_api_address: str
    #: The one task type to acquire (``flwr-clientapp`` or ``flwr-serverapp``).
    task_type: str
    #: The program (absolute path first) that runs one task; Flower's app arguments follow.
    command: tuple[str, ...]
    #: The SuperExec secret file shared with the SuperNode/SuperLink.
    secret_file: Path
    #: CA of the Runtime API's TLS certificate; None: plain HTTP (loopback only).
    root_certificates: Path | None = None
    #: Exit when this process is gone (the SuperNode or the launcher).
    parent_pid: int | None = None
    #: Where the private token directory is made (default: the system's temp dir).
    token_parent: Path | None = None
    #: Seconds between two ``acquire-task`` calls.
    poll_interval: float = DEFAULT_POLL_S
    #: Environment of the launched apps (default: the executor's own).
    env: Mapping[str, str] | None = field(default=None, repr=False)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """The executor's common command-line options."""
    parser.add_argument("--runtime-api-address", required=True, help="host:port (loopback).")
    parser.add_argument(
        "--superexec-auth-secret-file",
        type=Path,
        required=True,
        help="The file holding the SuperExec secret (the same as the SuperNode's/SuperLink's).",
    )
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="CA of the Runtime API's TLS.")
    tls.add_argument("--insecure", action="store_true", help="Plain HTTP (loopback only).")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when it exits.")
    parser.add_argument("--token-dir", type=Path, default=None, help="Parent of the token dir.")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S, help="Seconds.")


def config_from_args(
    args: argparse.Namespace, *, task_type: str, command: Sequence[str]
) -> ExecutorConfig:
    """An :class:`ExecutorConfig` from :func:`add_executor_args`' options."""
    if not command or not Path(command[0]).is_absolute():
        raise ExecutorError("the executor's program must be an absolute path")
    return ExecutorConfig(
        runtime_api_address=args.runtime_api_address,
        task_type=task_type,
        command=tuple(command),
        secret_file=args.superexec_auth_secret_file,
        root_certificates=None if args.insecure else args.root_certificates,
        parent_pid=args.parent_pid,
        token_parent=args.token_dir,
        poll_interval=args.poll_interval,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Executor:
    def __init__(self, config: ExecutorConfig) -> None:
        from flwr.supercore.interceptors import (
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        if config.task_type not in FLOWER_APP_COMMANDS:
            raise ExecutorError(f"unknown Flower task type {config.task_type!r}")
        self.config = config
        secret = load_secret(config.secret_file)
        verify: ssl.SSLContext | bool
        if config.root_certificates is None:
            base_url, verify = f"http://{config.runtime_api_address}", False
        else:
            base_url = f"https://{config.runtime_api_address}"
            verify = ssl.create_default_context(cafile=str(config.root_certificates))
        self.client = RuntimeHttpClient(
            base_url,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={ACQUIRE_TASK_METHOD}
                ),
            ],
            verify=verify,
            timeout=30.0,
        )
        self.token_dir = Path(
            tempfile.mkdtemp(prefix="concord-tokens-", dir=config.token_parent)
        )  # mode 0700
        self.children: dict[subprocess.Popen[bytes], Path] = {}
        self.stopping = False
        self._watch_ppid = (
            config.parent_pid if config.parent_pid == os.getppid() else None
        )  # our parent: a change of ppid means it is gone (even before it is reaped)

    def parent_gone(self) -> bool:
        pid = self.config.parent_pid
        if pid is None:
            return False
        if self._watch_ppid is not None and os.getppid() != self._watch_ppid:
            return True
        return not _alive(pid)

    def reap(self) -> None:
        for child, token_file in list(self.children.items()):
            if child.poll() is not None:
                with contextlib.suppress(FileNotFoundError):
                    token_file.unlink()
                del self.children[child]

    def acquire(self) -> tuple[int, str] | None:
        """One ``acquire-task`` call: ``(task_id, token)`` of a task of our type, or None."""
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        try:
            res = self.client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[self.config.task_type])
            )
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            if status == 401:
                log.error(
                    "the Runtime API at %s refused the SuperExec secret (401); check that "
                    "it was started with --isolation process and the same "
                    "--superexec-auth-secret-file",
                    self.config.runtime_api_address,
                )
            else:
                log.warning("acquire-task answered %s", status)
            return None
        except httpx.TransportError as exc:
            log.debug("Runtime API not reachable: %s", exc)
            return None
        if not (res.HasField("task") and res.token):
            return None
        if res.task.type != self.config.task_type:
            # Flower filters by type; should it ever not, the task is not started.
            log.error(
                "refused task %s of type %r (this executor runs only %r)",
                res.task.task_id,
                res.task.type,
                self.config.task_type,
            )
            return None
        return int(res.task.task_id), str(res.token)

    def launch(self, task_id: int, token: str) -> None:
        """Start the program for one task, its token in a private file (``--token-file``)."""
        token_file = write_private_file(self.token_dir / f"task-{task_id}.token", token.encode())
        tls = (
            ["--insecure"]
            if self.config.root_certificates is None
            else ["--root-certificates", str(self.config.root_certificates)]
        )
        argv = [
            *self.config.command,
            "--runtime-api-address",
            self.config.runtime_api_address,
            "--token-file",
            str(token_file),
            *tls,
            "--parent-pid",
            str(os.getpid()),
        ]
        env = dict(self.config.env) if self.config.env is not None else None
        try:
            child = subprocess.Popen(argv, env=env)
        except OSError as exc:
            token_file.unlink(missing_ok=True)
            log.error("could not start %s for task %s: %s", argv[0], task_id, exc)
            return
        self.children[child] = token_file
        log.info("task %s: started %s (pid %d)", task_id, Path(argv[0]).name, child.pid)

    def close(self) -> None:
        self.client.close()
        shutil.rmtree(self.token_dir, ignore_errors=True)


def run_executor(config: ExecutorConfig) -> int:
    """Acquire tasks of ``config.task_type`` and start ``config.command`` for each until
    SIGTERM/SIGINT or until ``config.parent_pid`` exits; the exit status (0).

    Raises :class:`ExecutorError` before the loop if the secret file is unusable.
    """
    executor = _Executor(config)

    def stop(signum: int, _frame: FrameType | None) -> None:
        executor.stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "executor for %s on %s (SuperExec-authenticated, tokens by file)",
        config.task_type,
        config.runtime_api_address,
    )
    try:
        while not executor.stopping:
            executor.reap()
            if executor.parent_gone():
                log.info("parent process %s is gone; stopping", config.parent_pid)
                break
            task = executor.acquire()
            if task is not None:
                executor.launch(*task)
                continue  # there may be more tasks waiting
            time.sleep(config.poll_interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        executor.close()
    return 0


def configure_logging() -> None:
    """Log ``concord.superexec`` lines to stderr (the executor's log file)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
