"""The warm runner (a zygote): import the heavy modules once, fork a worker per request.

The runner runs whatever target it is given (:class:`WarmRunner`, :func:`serve_site`); it
imports no ClientApp code. The site's entry point
(:mod:`site_node.federation.warm.__main__`) gives it the guarded ``flwr-clientapp``.

Per request the runner forks a *handler*, which forks the *worker*: a copy of the warm
runner that takes over the shim's standard streams, environment, working directory and
umask, runs the target with the shim's arguments, then exits. The handler reports the
worker's pid, forwards the shim's signals to it, kills it (SIGKILL) when the shim's
connection closes, and reports its exit code.

Security properties:

* Only installed code runs. The runner and its workers run ``site_node`` and Flower from
  the site's installation; a request carries arguments for Flower's own argument parser,
  environment variables and file descriptors, never code or a module name. The app bundle
  is checked in the worker exactly as in the in-process runner.
* The socket is private to the site's user: it is created with mode 0600 (a umask is set
  around ``bind``) in a directory that belongs to that user and is not writable by others
  (created with mode 0700 if missing; the runner refuses any other). The handler checks
  the peer's uid (``SO_PEERCRED``) and refuses other users (the shim checks the runner's
  likewise). Whoever can connect could already run ``flwr-clientapp`` as the site's user.
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

Lifetime: the runner binds its socket before it imports (requests wait in the backlog), and
exits on SIGTERM/SIGINT or when the process that started it exits (its parent pid changes).

This module imports only the standard library at the top; the heavy modules are what it
preloads (:data:`WARM_MODULES`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from site_node.federation.warm.protocol import (
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

__all__ = ["WARM_MODULES", "WarmRunner", "configure_logging", "serve_site"]

log = logging.getLogger("concord.warm")

#: What the site's runner imports once, before it serves (heaviest first).
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
                with short_path(path) as name:
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
            with short_path(path) as name:
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
        flush_stdio()
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
                flush_stdio()
                os._exit(code)
        conn.close()

    def _handle(self, conn: socket.socket) -> int:
        """In the handler process: take one request, fork its worker, report its exit."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)  # the worker gets these; we report its end
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            log.warning("warm runner: refused a connection from uid %d", uid)
            return 1
        conn.settimeout(REQUEST_TIMEOUT_S)
        send_frame(conn, {"hello": PROTOCOL})
        msg, fds, flags, _ = socket.recv_fds(conn, 1, len(STDIO))
        try:
            if not msg or flags & getattr(socket, "MSG_CTRUNC", 0):
                raise ValueError("no file descriptors")
            body = recv_frame(conn)
            if body is None:
                raise ValueError("no request")
            request = Request.parse(body, len(fds))
        except ValueError as exc:
            log.warning("warm runner: bad request: %s", exc)
            for fd in fds:
                os.close(fd)
            return 1
        flush_stdio()
        worker = os.fork()
        if worker == 0:
            self._become_worker(conn, fds, request)
        for fd in fds:
            os.close(fd)
        send_frame(conn, {"pid": worker})
        status = self._supervise(conn, worker)
        with contextlib.suppress(OSError):
            send_frame(conn, {"exit": os.waitstatus_to_exitcode(status)})
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
                        body = recv_frame(conn)
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

    def _become_worker(self, conn: socket.socket, fds: list[int], request: Request) -> NoReturn:
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
            for target_fd in set(STDIO) - set(request.fds):
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
            code = call_as_main(self.target, request.argv)
            with contextlib.suppress(Exception):
                atexit._run_exitfuncs()
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            flush_stdio()
            if code < 0:  # die by the same signal, as a program would
                with contextlib.suppress(Exception):
                    signal.signal(-code, signal.SIG_DFL)
                with contextlib.suppress(Exception):
                    os.kill(os.getpid(), -code)
            os._exit(code if code >= 0 else 128 - code)


def serve_site(
    state_dir: Path,
    target: Target,
    socket_path: Path | None = None,
    *,
    preload: Sequence[str] = WARM_MODULES,
    parent_pid: int | None = None,
) -> None:
    """Run a site's warm runner (foreground) until SIGTERM or until its parent exits.

    Each worker runs ``target`` with the shim's arguments; the socket is ``socket_path``
    or the state dir's default (:func:`~site_node.federation.warm.protocol.
    runner_socket_path`).
    """
    WarmRunner(
        socket_path or runner_socket_path(state_dir),
        target=target,
        preload=preload,
        parent_pid=parent_pid,
    ).serve()


def configure_logging() -> None:
    """Log the runner's lines (``concord.warm``) to stderr, which is its log file."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
