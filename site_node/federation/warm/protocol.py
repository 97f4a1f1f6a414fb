"""What the shim and the warm runner agree on: the socket, the frames, the request, exit codes.

Both ends import this module, so it imports only the standard library (the shim starts with
every message and must stay light).

Frames are a 4-byte big-endian length and a JSON object (at most :data:`MAX_FRAME` bytes).
A conversation, after the runner's ``{"hello": PROTOCOL}``:

1. the shim sends its standard streams as file descriptors (``SCM_RIGHTS``, with one byte),
   then the :class:`Request`: arguments for Flower's own parser, environment, working
   directory, umask, which of fds 0-2 it sent. Never code or a module name;
2. the runner answers ``{"pid": N}`` once the worker runs (from then on there is no
   fallback, so a message never runs twice);
3. the shim may send ``{"signal": S}`` for a signal of :data:`FORWARDED_SIGNALS`;
4. the runner ends with ``{"exit": C}``: the worker's exit code, ``-N`` when signal ``N``
   killed it (:func:`call_as_main` gives the same codes for a target run in-process).

The socket lives in a directory of the site's user (:func:`runner_socket_path`); both ends
check the other's uid with :func:`peer_uid` (``SO_PEERCRED``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ACCEPT_TIMEOUT_S",
    "FORWARDED_SIGNALS",
    "MAX_FRAME",
    "PROTOCOL",
    "REQUEST_TIMEOUT_S",
    "SOCKET_NAME",
    "STDIO",
    "Request",
    "Target",
    "call_as_main",
    "flush_stdio",
    "peer_uid",
    "recv_frame",
    "runner_socket_path",
    "send_frame",
    "short_path",
]

#: File name of the runner's socket, in ``<state_dir>/supernode/runner/`` by default.
SOCKET_NAME = "clientapp.sock"
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
#: How long either end waits for the next frame of a request before the worker runs.
REQUEST_TIMEOUT_S = 30.0
#: Version of the conversation, sent in the runner's hello.
PROTOCOL = 1
#: Largest frame either end accepts (the environment is the biggest part).
MAX_FRAME = 4 << 20
#: The standard streams a shim may hand over.
STDIO = (0, 1, 2)

_HEADER = struct.Struct("!I")
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux; keep a margin

#: What a worker (or the shim's fallback) runs: a program's main taking its arguments.
Target = Callable[[list[str]], object]


def runner_socket_path(state_dir: Path) -> Path:
    """Default socket of the site's warm runner: ``<state_dir>/supernode/runner/clientapp.sock``."""
    return state_dir / "supernode" / "runner" / SOCKET_NAME


# --- framing: 4-byte length + JSON object ------------------------------------------------


def send_frame(sock: socket.socket, body: dict[str, Any]) -> None:
    """Send one frame holding ``body``."""
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


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None at end of stream. Raises ValueError on a malformed frame."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    data = _recv_exact(sock, size)
    if data is None:
        return None
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("frame is not an object")
    return body


@dataclass
class Request:
    """What a shim asks the runner to run: everything a new ``flwr-clientapp`` would get.

    ``fds`` names which of the standard streams (:data:`STDIO`) came with the request, in
    the order their descriptors were sent.
    """

    argv0: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    fds: list[int]

    def to_frame(self) -> dict[str, Any]:
        """The request as the body of a frame."""
        return asdict(self)

    @classmethod
    def parse(cls, body: dict[str, Any], received: int) -> Request:
        """Check a frame's body against the request model and the ``received`` descriptors.

        Raises ValueError for anything but plain strings, a string map, integers and
        standard-stream numbers matching what was received.
        """
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
            and all(fd in STDIO for fd in fds)
            and len(fds) == received
        ):
            raise ValueError("malformed request")
        return cls(body["argv0"], argv, env, body["cwd"], int(body["umask"]) & 0o777, fds)


# --- both ends: the socket's peer, its name, running a target ----------------------------


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end (``SO_PEERCRED``), or None where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
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


def flush_stdio() -> None:
    """Flush Python's stdout and stderr (before a fork or an exit), ignoring errors."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def call_as_main(target: Target, argv: list[str]) -> int:
    """Run ``target`` like a program's main: its exit code (SystemExit, exceptions).

    ``-SIGINT`` for a KeyboardInterrupt, as the ``exit`` frame reports a signal.
    """
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
