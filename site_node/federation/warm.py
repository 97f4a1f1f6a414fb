"""The site's warm ClientApp runner: Flower's process per message, without the import cost.

Why: a Flower 1.41 SuperNode (``flower-superexec``) starts one ``flwr-clientapp`` process
per message (train and evaluate, every round). Each of those imports torch, MONAI, Opacus,
TenSEAL and Flower before it does any work: several seconds per message, most of a demo
round on a small machine.

How: a per-site *warm runner* (a zygote) imports those modules once and waits on a Unix
socket. The ``flwr-clientapp`` that the SuperNode starts is the site's shim
(:func:`shim_main`, written by
:func:`site_node.federation.processes.write_runner_shim`): a small process that imports
nothing heavy, hands its arguments, environment, working directory and standard streams to
the runner, and waits. The runner forks a *handler* per request, which forks the *worker*:
a copy of the warm runner that runs :func:`site_node.federation.processes.
guarded_clientapp_main` (Flower's ``run_clientapp`` with the bundle check) with those
arguments, then exits. Flower's protocol is unchanged: one process per message, started
by ``flower-superexec`` and ending with the message; the worker's exit status becomes the
shim's (a worker killed by a signal kills the shim with the same signal); SIGTERM, SIGINT,
SIGQUIT and SIGHUP sent to the shim are forwarded to the worker; a shim that vanishes
(SIGKILL, say with its SuperNode) takes its worker with it (SIGKILL).

If the runner cannot be reached (no socket, connection refused, no answer in
:data:`ACCEPT_TIMEOUT_S`) the shim logs one line and runs the ClientApp in-process, as
before: slower, same checks. Once the runner has started a worker there is no fallback,
so a message never runs twice.

Security properties:

* Only installed code runs. The runner and its workers run ``site_node`` and Flower from
  the site's installation; a request carries arguments for Flower's own argument parser,
  environment variables and file descriptors, never code or a module name. The app bundle
  is checked in the worker exactly as in the in-process runner.
* The socket is private to the site's user: it is created with mode 0600 (a umask is set
  around ``bind``) in a directory that belongs to that user and is not writable by others
  (created with mode 0700 if missing; the runner refuses any other). Both ends check the
  other's uid (``SO_PEERCRED``): the handler refuses other users, and the shim never hands
  its environment and streams to a runner of another user. Whoever can connect could
  already run ``flwr-clientapp`` as the site's user.
* Fork safety: the runner only imports; it starts no Python thread (it logs a warning if
  an import did), no gRPC channel and no torch/OpenMP work before forking. The only other
  threads are the idle OpenBLAS pools that NumPy and SciPy start at import, which OpenBLAS
  shuts down around ``fork`` (the same situation as PyTorch's forked DataLoader workers).
  Children close the listening socket straight away and never return into the accept
  loop (they end with ``os._exit``).
* Fresh randomness: a forked worker would otherwise continue the runner's random streams
  (the same DP noise and batch sampling in every message). Python's ``random`` is reseeded
  by the interpreter at fork; each worker reseeds NumPy's global generator and torch's
  default generator from the OS, as a new process does at import.

Lifetime: the runner exits on SIGTERM/SIGINT, or when the process that started it exits
(its parent pid changes). :func:`~site_node.federation.processes.start_supernode` starts it
next to the SuperNode and returns a handle that stops both; ``site-node supernode`` (the
Helm chart's SuperNode container) starts it before it execs ``flower-supernode``, which
thereby becomes its parent.

This module imports only the standard library at the top: the shim imports it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ACCEPT_TIMEOUT_S",
    "FORWARDED_SIGNALS",
    "SOCKET_NAME",
    "WARM_MODULES",
    "RunnerUnavailableError",
    "WarmRunner",
    "clientapp_target",
    "main",
    "run_in_runner",
    "runner_socket_path",
    "serve_site",
    "shim_main",
]

log = logging.getLogger("concord.warm")

#: File name of the runner's socket, in ``<state_dir>/supernode/runner/`` by default.
SOCKET_NAME = "clientapp.sock"
#: What the runner imports once, before it serves (heaviest first).
WARM_MODULES: tuple[str, ...] = (
    "torch",
    "torch._dynamo",  # torch.optim imports it at the first step (~1.5 s)
    "monai",
    "opacus",
    "tenseal",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.supernode.cli.flwr_clientapp",
    "site_node.federation.processes",
    "site_node.federation.clientapp",
)
#: Signals the shim passes on to its worker.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
)
#: How long a shim waits for the runner to take its request (the runner may still be
#: importing) before it runs the ClientApp in-process instead.
ACCEPT_TIMEOUT_S = 60.0

_PROTOCOL = 1
_HEADER = struct.Struct("!I")
_MAX_FRAME = 4 << 20
_STDIO = (0, 1, 2)
_REQUEST_TIMEOUT_S = 30.0
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux; keep a margin

Target = Callable[[list[str]], object]


class RunnerUnavailableError(Exception):
    """The warm runner could not take the request; nothing was run."""


def runner_socket_path(state_dir: Path) -> Path:
    """Default socket of the site's warm runner: ``<state_dir>/supernode/runner/clientapp.sock``."""
    return state_dir / "supernode" / "runner" / SOCKET_NAME


# --- framing: 4-byte length + JSON object ------------------------------------------------


def _send(sock: socket.socket, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None at end of stream. Raises ValueError on a malformed frame."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > _MAX_FRAME:
        raise ValueError("frame too large")
    data = _recv_exact(sock, size)
    if data is None:
        return None
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("frame is not an object")
    return body


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits ``sun_path``: the path itself, or (long paths) its
    file name while the working directory is its parent. Single-threaded callers only."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    here = os.open(".", os.O_RDONLY)
    try:
        os.chdir(path.parent)
        yield path.name
    finally:
        os.fchdir(here)
        os.close(here)


# --- the shim (client) side -------------------------------------------------------------


def _open_stdio() -> list[int]:
    fds = []
    for fd in _STDIO:
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
    :data:`FORWARDED_SIGNALS` received meanwhile are passed on to the worker. Raises
    :class:`RunnerUnavailableError` if the runner did not take the request (then nothing
    ran and the caller may run the ClientApp itself).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous: dict[int, Any] = {}
    try:
        try:
            sock.settimeout(accept_timeout)
            with _short_path(socket_path) as name:
                sock.connect(name)
            runner_uid = _peer_uid(sock)
            if runner_uid is not None and runner_uid != os.getuid():
                # Never hand our environment and streams to another user's process.
                raise RunnerUnavailableError(f"the socket belongs to uid {runner_uid}")
            hello = _recv(sock)
            if hello is None or hello.get("hello") != _PROTOCOL:
                raise RunnerUnavailableError("the runner closed the connection")
            fds = _open_stdio()
            socket.send_fds(sock, [b"\0"], fds)
            request = {
                "argv0": argv0,
                "argv": list(argv),
                "env": dict(os.environ),
                "cwd": os.getcwd(),
                "umask": _current_umask(),
                "fds": fds,
            }
            _send(sock, request)
            sock.settimeout(_REQUEST_TIMEOUT_S)
            started = _recv(sock)
        except (OSError, ValueError) as exc:
            raise RunnerUnavailableError(f"{type(exc).__name__}: {exc}") from None
        if started is None or not isinstance(started.get("pid"), int):
            raise RunnerUnavailableError("the runner did not start a worker")
        worker = int(started["pid"])

        # From here on the worker runs: no fallback. Forward signals until it exits.
        sock.settimeout(None)

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(OSError):
                _send(sock, {"signal": signum})

        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
        try:
            done = _recv(sock)
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
    _flush_stdio()
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
    (:func:`~site_node.federation.processes.guarded_clientapp_main` for ``state_dir``).
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
    run = fallback or (lambda a: clientapp_target(state_dir, a))
    return _exit_like(_call(run, args))


# --- the runner (zygote) side -----------------------------------------------------------


def clientapp_target(state_dir: Path, argv: list[str]) -> object:
    """What a worker runs: the guarded ``flwr-clientapp`` for ``state_dir``."""
    from site_node.federation.processes import guarded_clientapp_main

    guarded_clientapp_main(state_dir, argv)
    return None


def _call(target: Target, argv: list[str]) -> int:
    """Run ``target`` like a program's main: its exit code (SystemExit, exceptions)."""
    code = 0
    try:
        result = target(argv)
        if isinstance(result, int) and not isinstance(result, bool):
            code = result
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = -signal.SIGINT
    except BaseException:  # a program would print the traceback and exit 1
        traceback.print_exc()
        code = 1
    return code


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _reseed() -> None:
    """Give a worker fresh random state, as a new process has (see the module docstring).

    Without this every worker would continue the runner's NumPy and torch streams: the
    same DP noise and Poisson batches in every message.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # from the OS, as at import in a new process
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()  # a non-deterministic seed, as torch gives a new process


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _peer_uid(conn: socket.socket) -> int | None:
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@dataclass
class _Request:
    argv0: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    fds: list[int]

    @classmethod
    def parse(cls, body: dict[str, Any], received: int) -> _Request:
        argv, env, fds = body.get("argv"), body.get("env"), body.get("fds")
        if not (
            isinstance(body.get("argv0"), str)
            and isinstance(argv, list)
            and all(isinstance(a, str) for a in argv)
            and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(body.get("cwd"), str)
            and isinstance(body.get("umask"), int)
            and isinstance(fds, list)
            and all(fd in _STDIO for fd in fds)
            and len(fds) == received
        ):
            raise ValueError("malformed request")
        return cls(body["argv0"], argv, env, body["cwd"], int(body["umask"]) & 0o777, fds)


@dataclass
class WarmRunner:
    """A zygote: imports ``preload`` once, then runs ``target(argv)`` in a fork per request.

    ``parent_pid``: the runner stops when its parent process is no longer this one
    (default: the parent at :meth:`serve`).
    """

    socket_path: Path
    target: Target
    preload: Sequence[str] = ()
    parent_pid: int | None = None
    _stopping: bool = field(default=False, init=False, repr=False)

    def serve(self) -> None:
        """Bind the socket, import ``preload``, then serve until stopped (see module)."""
        parent = os.getppid() if self.parent_pid is None else self.parent_pid
        listener, inode = self._bind()
        try:
            # Requests wait in the backlog while the runner imports (SIGTERM still kills).
            self._warm_up()
            signal.signal(signal.SIGTERM, self._stop)
            signal.signal(signal.SIGINT, self._stop)
            # Handlers are reaped by the kernel; a handler resets this before its fork.
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            listener.settimeout(0.5)
            log.info("warm runner ready on %s (pid %d)", self.socket_path, os.getpid())
            while not self._stopping:
                if os.getppid() != parent:
                    log.info("warm runner: parent %d exited; stopping", parent)
                    break
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:  # e.g. out of file descriptors: try again
                    log.warning("warm runner: accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                self._fork_handler(listener, conn)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                if os.stat(self.socket_path).st_ino == inode:
                    os.unlink(self.socket_path)
            log.info("warm runner stopped")

    def _stop(self, _signum: int, _frame: object) -> None:
        self._stopping = True

    def _bind(self) -> tuple[socket.socket, int]:
        path = self.socket_path
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
            path.parent.chmod(0o700)
        folder = path.parent.stat()
        if folder.st_uid != os.getuid() or folder.st_mode & 0o022:
            raise RuntimeError(
                f"{path.parent} must belong to this user and not be writable by others"
            )
        if path.exists() or path.is_symlink():
            mode = path.lstat().st_mode
            if not stat.S_ISSOCK(mode):
                raise RuntimeError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with _short_path(path) as name:
                    probe.connect(name)
            except OSError:
                path.unlink()  # stale: nobody listens
            else:
                raise RuntimeError(f"a warm runner already listens on {path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)
        try:
            with _short_path(path) as name:
                listener.bind(name)
        finally:
            os.umask(old_mask)
        path.chmod(0o600)
        listener.listen(16)
        return listener, path.stat().st_ino

    def _warm_up(self) -> None:
        started = time.perf_counter()
        for name in self.preload:
            try:
                importlib.import_module(name)
            except Exception as exc:  # the worker imports lazily instead
                log.warning("warm runner: could not import %s: %s", name, exc)
        import threading

        if threading.active_count() > 1:
            log.warning(
                "warm runner: Python threads after the imports (%s); forking anyway",
                ", ".join(t.name for t in threading.enumerate()),
            )
        # Native threads here are OpenBLAS pools (NumPy's and SciPy's), idle after import;
        # OpenBLAS shuts its pool down around fork (pthread_atfork), as for DataLoader workers.
        log.info("warm runner: %d native threads after the imports", _native_threads())
        gc.collect()
        gc.freeze()  # keep the imported objects' pages shared with the workers
        elapsed = time.perf_counter() - started
        log.info("warm runner: imported %d modules in %.1fs", len(self.preload), elapsed)

    def _fork_handler(self, listener: socket.socket, conn: socket.socket) -> None:
        _flush_stdio()
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("warm runner: fork failed: %s", exc)
            conn.close()
            return
        if pid == 0:  # handler: never returns into the accept loop
            code = 1
            try:
                listener.close()
                code = self._handle(conn)
            except OSError as exc:
                log.info("warm runner: the client went away (%s)", exc)
            except BaseException:
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                _flush_stdio()
                os._exit(code)
        conn.close()

    def _handle(self, conn: socket.socket) -> int:
        """In the handler process: take one request, fork its worker, report its exit."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)  # the worker gets these; we report its end
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        uid = _peer_uid(conn)
        if uid is not None and uid != os.getuid():
            log.warning("warm runner: refused a connection from uid %d", uid)
            return 1
        conn.settimeout(_REQUEST_TIMEOUT_S)
        _send(conn, {"hello": _PROTOCOL})
        msg, fds, flags, _ = socket.recv_fds(conn, 1, len(_STDIO))
        try:
            if not msg or flags & getattr(socket, "MSG_CTRUNC", 0):
                raise ValueError("no file descriptors")
            body = _recv(conn)
            if body is None:
                raise ValueError("no request")
            request = _Request.parse(body, len(fds))
        except ValueError as exc:
            log.warning("warm runner: bad request: %s", exc)
            for fd in fds:
                os.close(fd)
            return 1
        _flush_stdio()
        worker = os.fork()
        if worker == 0:
            self._become_worker(conn, fds, request)
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": worker})
        status = self._supervise(conn, worker)
        with contextlib.suppress(OSError):
            _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
        return 0

    def _supervise(self, conn: socket.socket, worker: int) -> int:
        """Forward the shim's signals to ``worker`` until it exits; its wait status."""
        conn.settimeout(None)
        waitable: list[Any] = [conn]
        pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(worker)
            waitable.append(pidfd)
        try:
            while True:
                done, status = os.waitpid(worker, os.WNOHANG)
                if done:
                    return status
                ready, _, _ = select.select(waitable, [], [], None if pidfd is not None else 0.05)
                if conn in ready:
                    try:
                        body = _recv(conn)
                    except (OSError, ValueError):
                        body = None
                    if body is None:  # the shim is gone (killed): so goes its worker
                        with contextlib.suppress(OSError):
                            os.kill(worker, signal.SIGKILL)
                        waitable.remove(conn)
                        continue
                    signum = body.get("signal")
                    if signum in {int(s) for s in FORWARDED_SIGNALS}:
                        with contextlib.suppress(OSError):
                            os.kill(worker, int(signum))
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _become_worker(self, conn: socket.socket, fds: list[int], request: _Request) -> NoReturn:
        """In the worker process: take over the shim's stdio, environment and directory,
        run the target, exit with its code."""
        code = 1
        try:
            conn.close()
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            for target_fd, fd in zip(request.fds, fds, strict=True):
                os.dup2(fd, target_fd)
                os.close(fd)
            for target_fd in set(_STDIO) - set(request.fds):
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, target_fd)
                os.close(null)
            os.environ.clear()
            os.environ.update(request.env)
            os.umask(request.umask)
            with contextlib.suppress(OSError):
                os.chdir(request.cwd)
            sys.argv = [request.argv0, *request.argv]
            _reseed()
            code = _call(self.target, request.argv)
            with contextlib.suppress(Exception):
                atexit._run_exitfuncs()
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            _flush_stdio()
            if code < 0:  # die by the same signal, as a program would
                with contextlib.suppress(Exception):
                    signal.signal(-code, signal.SIG_DFL)
                with contextlib.suppress(Exception):
                    os.kill(os.getpid(), -code)
            os._exit(code if code >= 0 else 128 - code)


def serve_site(
    state_dir: Path, socket_path: Path | None = None, *, parent_pid: int | None = None
) -> None:
    """Run the site's warm runner (foreground) until SIGTERM or until its parent exits."""
    WarmRunner(
        socket_path or runner_socket_path(state_dir),
        target=lambda argv: clientapp_target(state_dir, argv),
        preload=WARM_MODULES,
        parent_pid=parent_pid,
    ).serve()


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m site_node.federation.warm --state-dir DIR [--socket PATH]``."""
    parser = argparse.ArgumentParser(description="The site's warm ClientApp runner.")
    parser.add_argument("--state-dir", type=Path, required=True, help="The site's state dir.")
    parser.add_argument("--socket", type=Path, default=None, help="Socket path.")
    args = parser.parse_args(argv)
    _configure_logging()
    serve_site(args.state_dir, args.socket)


if __name__ == "__main__":
    main()
