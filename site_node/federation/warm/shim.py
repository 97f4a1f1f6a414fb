"""The site's ``flwr-clientapp``: hand the message to the warm runner, else run it here.

The SuperNode's ``flower-superexec`` starts this (through the script that
:func:`site_node.federation.processes.write_runner_shim` writes) once per message. It
imports nothing heavy: the standard library, the protocol and the site's error root (which
itself imports only :mod:`concord_protocol.errors`). It hands its arguments, environment,
working directory, umask and standard streams to the runner and waits for the worker's end:

* the worker's exit status becomes the shim's; a worker killed by a signal kills the shim
  with the same signal;
* SIGTERM, SIGINT, SIGQUIT and SIGHUP sent to the shim are forwarded to the worker;
* a shim that vanishes (SIGKILL, say with its SuperNode) takes its worker with it: the
  runner sees the connection close and kills the worker.

It never hands its environment and streams to a runner of another user: it checks the
socket's owner (``SO_PEERCRED``) before it sends anything.

If the runner cannot be reached (no socket, connection refused, no answer in
:data:`~site_node.federation.warm.protocol.ACCEPT_TIMEOUT_S`) the shim logs one line and
runs the guarded ClientApp in-process, as before: slower, same checks. Once the runner has
started a worker there is no fallback, so a message never runs twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from site_node.errors import SiteError
from site_node.federation.warm.protocol import (
    ACCEPT_TIMEOUT_S,
    FORWARDED_SIGNALS,
    PROTOCOL,
    REQUEST_TIMEOUT_S,
    STDIO,
    Request,
    Target,
    call_as_main,
    flush_stdio,
    peer_uid,
    recv_frame,
    runner_socket_path,
    send_frame,
    short_path,
)

__all__ = ["RunnerUnavailableError", "run_in_runner", "shim_main"]


class RunnerUnavailableError(SiteError):
    """The warm runner could not take the request; nothing was run (the shim falls back)."""

    code = "runner.unavailable"


def _open_stdio() -> list[int]:
    fds = []
    for fd in STDIO:
        with contextlib.suppress(OSError):
            os.fstat(fd)
            fds.append(fd)
    return fds


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_in_runner(
    socket_path: Path,
    argv: Sequence[str],
    *,
    argv0: str = "flwr-clientapp",
    accept_timeout: float = ACCEPT_TIMEOUT_S,
) -> int:
    """Run one ClientApp in the warm runner at ``socket_path``; the worker's exit code.

    The code is negative (``-N``) when the worker was killed by signal ``N``. Signals in
    :data:`~site_node.federation.warm.protocol.FORWARDED_SIGNALS` received meanwhile are
    passed on to the worker. Raises :class:`RunnerUnavailableError` if the runner did not
    take the request (then nothing ran and the caller may run the ClientApp itself).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous: dict[int, Any] = {}
    try:
        try:
            sock.settimeout(accept_timeout)
            with short_path(socket_path) as name:
                sock.connect(name)
            runner_uid = peer_uid(sock)
            if runner_uid is not None and runner_uid != os.getuid():
                # Never hand our environment and streams to another user's process.
                raise RunnerUnavailableError(f"the socket belongs to uid {runner_uid}")
            hello = recv_frame(sock)
            if hello is None or hello.get("hello") != PROTOCOL:
                raise RunnerUnavailableError("the runner closed the connection")
            fds = _open_stdio()
            socket.send_fds(sock, [b"\0"], fds)
            request = Request(
                argv0=argv0,
                argv=list(argv),
                env=dict(os.environ),
                cwd=os.getcwd(),
                umask=_current_umask(),
                fds=fds,
            )
            send_frame(sock, request.to_frame())
            sock.settimeout(REQUEST_TIMEOUT_S)
            started = recv_frame(sock)
        except (OSError, ValueError) as exc:
            raise RunnerUnavailableError(f"{type(exc).__name__}: {exc}") from None
        if started is None or not isinstance(started.get("pid"), int):
            raise RunnerUnavailableError("the runner did not start a worker")
        worker = int(started["pid"])

        # From here on the worker runs: no fallback. Forward signals until it exits.
        sock.settimeout(None)

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                send_frame(sock, {"signal": signum})

        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        try:
            done = recv_frame(sock)
        except (OSError, ValueError):
            done = None
        if done is None or not isinstance(done.get("exit"), int):
            print(
                f"concord: the warm ClientApp runner went away; stopping worker {worker}",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(OSError):
                os.kill(worker, signal.SIGTERM)
            return 1
        return int(done["exit"])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()


def _exit_like(code: int) -> int:
    """Exit status for the shim: ``code``, or die by the worker's signal when negative."""
    if code >= 0:
        return code
    signum = -code
    flush_stdio()
    with contextlib.suppress(OSError, ValueError):  # SIGKILL/SIGSTOP have no handler
        signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signum)
    return 128 + signum


def shim_main(
    state_dir: Path,
    socket_path: Path | None = None,
    argv: Sequence[str] | None = None,
    *,
    fallback: Target | None = None,
) -> int:
    """``flwr-clientapp`` of the site: run in the warm runner, else in-process; exit status.

    ``fallback`` (tests) replaces the in-process runner
    (:func:`~site_node.federation.warm.target.clientapp_target` of ``state_dir``, which
    imports the guarded ClientApp only when it runs).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    path = socket_path or runner_socket_path(state_dir)
    try:
        return _exit_like(run_in_runner(path, args, argv0=sys.argv[0]))
    except RunnerUnavailableError as exc:
        print(
            f"concord: warm ClientApp runner at {path} not reachable ({exc}); running in-process",
            file=sys.stderr,
            flush=True,
        )
    if fallback is None:
        from site_node.federation.warm.target import clientapp_target

        fallback = clientapp_target(state_dir)
    return _exit_like(call_as_main(fallback, args))
