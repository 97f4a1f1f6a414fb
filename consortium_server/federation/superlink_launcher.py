"""Concord's SuperLink: Flower's own app, served so that only the Fleet API is public.

``python -m consortium_server.federation.superlink_launcher --fleet-address 0.0.0.0:9092
--control-address 0.0.0.0:9093 [--control-client-ca CA] [--allow-serverapp HASH=ref ...]
-- <flower-superlink arguments: --ssl-*, --enable-supernode-auth, --database, --host
127.0.0.1 --port 9091 ...>``

Why. ``flower-superlink`` 1.41 serves its Control, Fleet and Runtime APIs from one FastAPI
app on one uvicorn listener with server-only TLS (``superlink/main.py:create_app``,
``superlink/cli/flower_superlink.py:_run_superlink_http_api``), and in the open-source
build the Control API authenticates nobody (its account plugin is a no-op). Anyone who can
reach the port and holds the public CA certificate can therefore start runs (ship code to
the SuperLink and to every site), list and stop runs, and register or unregister
SuperNodes; the Runtime API's ``acquire-task`` is open too unless Flower runs with
``--isolation process`` and a SuperExec secret. No flag or environment variable splits the
listener.

What this does. It builds the very same app (Flower's argument parsing,
``_parse_superlink_lifespan_config``; ``create_app(config, SuperLinkLifespan)``) and serves
it on three uvicorn servers in one event loop, each behind a path allow-list derived from
Flower's own routers (:func:`route_groups`), exact method and path, everything else 404
(``/docs`` and ``/openapi.json`` included):

* **Fleet** (``--fleet-address``, the only public port): ``POST /v1/fleet/*`` and
  ``/health``, server TLS. Flower's SuperNode authentication (signed requests, keys
  registered through Control) applies as before;
* **Control** (``--control-address``, an internal port that only the API pods may reach):
  ``POST /v1/control/*``, TLS that **requires a client certificate** signed by
  ``--control-client-ca`` (default: Flower's ``--ssl-ca-certfile``). The consortium server
  presents one (:mod:`~consortium_server.federation.control_client`); an outsider with only
  the CA certificate fails the TLS handshake;
* **Runtime** (Flower's ``--host``/``--port``, which must be loopback): ``/v1/runtime/*``
  and ``/health``, for the ServerApp in this pod. Flower runs with ``--isolation process``
  and ``--superexec-auth-secret-file`` (a fresh 0600 file in a private directory unless one
  is given), so ``acquire-task`` needs the secret. The launcher starts the only holder of
  that secret, :mod:`~consortium_server.federation.serverapp_executor`, as its child: it
  acquires only ServerApp tasks and starts the guarded ServerApp (Concord's bundle only,
  token by file).

``--isolation subprocess``, ``--insecure``, a non-loopback runtime ``--host`` and Flower's
legacy gRPC switches (``FLWR_INTERNAL_GRPC_CONTROL_API``/``_FLEET_API``, removed from the
environment) are refused, because each would reopen what the split closes. Deny stubs for
every other Flower app command (:func:`concord_protocol.superexec.write_deny_stubs`) go
first on ``PATH`` for the SuperLink and everything it starts.

It relies on private Flower 1.41 names (``_parse_superlink_lifespan_config``,
``SuperLinkLifespan``, the router modules) and on ``uvicorn.Server.capture_signals``;
``tests/unit/consortium_server/federation/test_superlink_launcher.py`` pins them and fails
loudly when ``flwr`` changes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from concord_protocol.superexec import IsolationRefusedError, isolated_args, write_deny_stubs
from consortium_server.federation.serverapp_executor import executor_args

__all__ = [
    "LAUNCHER_MODULE",
    "Listener",
    "PathAllowList",
    "launcher_args",
    "main",
    "route_groups",
]

log = logging.getLogger("concord.superlink")

#: ``python -m`` this module.
LAUNCHER_MODULE = "consortium_server.federation.superlink_launcher"
#: Environment switches that make Flower open extra gRPC listeners (Control without auth).
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LauncherError(SystemExit):
    """A refused configuration: exits 2 with the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(f"concord-superlink: {message}")


# --- the path allow-lists ------------------------------------------------------------------


def route_groups(app: Any) -> dict[str, frozenset[tuple[str, str]]]:
    """``(method, path)`` of every route of Flower's app, by API: ``fleet``, ``control``,
    ``runtime``, ``health``; ``other`` holds what no listener serves (``/docs``,
    ``/openapi.json``, and any router a later Flower adds)."""
    groups: dict[str, set[tuple[str, str]]] = {
        name: set() for name in ("fleet", "control", "runtime", "health", "other")
    }
    from fastapi.routing import iter_route_contexts  # as Flower's create_app walks them

    for route in iter_route_contexts(app.routes):
        path = str(route.path or "")
        methods = route.methods or set()
        if path.startswith("/v1/fleet/"):
            group = "fleet"
        elif path.startswith("/v1/control/"):
            group = "control"
        elif path.startswith("/v1/runtime/"):
            group = "runtime"
        elif path == "/health":
            group = "health"
        else:
            group = "other"
        groups[group].update((str(method), path) for method in methods)
    return {name: frozenset(items) for name, items in groups.items()}


class PathAllowList:
    """ASGI wrapper: pass on requests whose exact ``(method, path)`` is allowed (and the
    lifespan), answer 404 to every other HTTP request and close every WebSocket."""

    def __init__(self, app: ASGIApp, allowed: frozenset[tuple[str, str]], *, name: str) -> None:
        self.app = app
        self.allowed = allowed
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind == "http" and (scope.get("method"), scope.get("path")) in self.allowed:
            await self.app(scope, receive, send)
            return
        if kind == "http":
            body = b'{"detail":"Not Found"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})


# --- the listeners ---------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """One uvicorn server of the launcher."""

    name: str
    host: str
    port: int
    groups: tuple[str, ...]
    #: CA whose client certificates the listener requires (None: server TLS only).
    client_ca: str | None = None
    lifespan: bool = False


def _split_address(address: str, option: str) -> tuple[str, int]:
    from flwr.supercore.address import parse_address

    parsed = parse_address(address)
    if not parsed:
        raise LauncherError(f"{option} {address!r} is not host:port")
    host, port, _ = parsed
    return str(host), int(port)


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """A uvicorn server that leaves signals to the launcher (several run in one loop)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _servers(app: Any, listeners: Sequence[Listener], config: Any) -> list[Any]:
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    groups = route_groups(app)
    server_class = _server_class()
    servers = []
    for listener in listeners:
        allowed = frozenset().union(*(groups[g] for g in listener.groups))
        uv_config = uvicorn.Config(
            app=PathAllowList(app, allowed, name=listener.name),
            host=listener.host,
            port=listener.port,
            lifespan="on" if listener.lifespan else "off",
            ssl_certfile=config.ssl_certfile,
            ssl_keyfile=config.ssl_keyfile,
            ssl_cert_reqs=ssl.CERT_REQUIRED if listener.client_ca else ssl.CERT_NONE,
            ssl_ca_certs=listener.client_ca,
            proxy_headers=False,
            server_header=False,
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            workers=1,
        )
        servers.append(server_class(uv_config))
        log.info(
            "%s listener on %s:%d (%s%s)",
            listener.name,
            listener.host,
            listener.port,
            ", ".join(listener.groups),
            ", client certificate required" if listener.client_ca else "",
        )
    return servers


async def _serve(servers: Sequence[Any]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()  # one listener ended: end them all
    if pending:
        await asyncio.wait(pending)
    for task in done:
        task.result()


# --- arguments -------------------------------------------------------------------------


def _concord_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concord-superlink",
        description="Flower's SuperLink with the Fleet API alone on the public port.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--fleet-address", required=True, help="host:port of the public Fleet listener."
    )
    parser.add_argument(
        "--control-address",
        required=True,
        help="host:port of the Control listener (mutual TLS; reachable by the API only).",
    )
    parser.add_argument(
        "--control-client-ca",
        type=Path,
        default=None,
        help="CA of the client certificates Control accepts (default: --ssl-ca-certfile).",
    )
    parser.add_argument(
        "--allow-serverapp",
        action="append",
        default=[],
        metavar="HASH=MODULE:ATTR",
        help="An extra app bundle the guarded ServerApp may run (default: Concord's only).",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="Private directory for the deny stubs and a generated SuperExec secret "
        "(default: a new one in the temp dir).",
    )
    return parser


def launcher_args(
    *,
    fleet_address: str,
    control_address: str,
    flower_args: Sequence[str],
    control_client_ca: Path | None = None,
    allow_serverapp: Sequence[str] = (),
    work_dir: Path | None = None,
) -> list[str]:
    """``argv`` of the launcher (this interpreter, ``-m``)."""
    args = [
        sys.executable,
        "-m",
        LAUNCHER_MODULE,
        "--fleet-address",
        fleet_address,
        "--control-address",
        control_address,
    ]
    if control_client_ca is not None:
        args += ["--control-client-ca", str(control_client_ca)]
    for entry in allow_serverapp:
        args += ["--allow-serverapp", entry]
    if work_dir is not None:
        args += ["--work-dir", str(work_dir)]
    return [*args, "--", *flower_args]


def _flower_config(flower_args: list[str]) -> Any:
    """Flower's own parsing of ``flower_args`` (it reads ``sys.argv``)."""
    from flwr.superlink.cli.flower_superlink import _parse_superlink_lifespan_config

    saved = sys.argv
    sys.argv = ["flower-superlink", *flower_args]
    try:
        return _parse_superlink_lifespan_config()
    finally:
        sys.argv = saved


def _checked_flower_args(flower_args: list[str], work_dir: Path) -> tuple[list[str], Path]:
    """Flower's arguments completed (``--isolation process``, a secret file) and checked;
    with the SuperExec secret file's path."""
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    try:
        checked = isolated_args(
            _parse_args_run_superlink(), flower_args, default_secret=work_dir / "superexec.secret"
        )
    except IsolationRefusedError as exc:
        if exc.option == "isolation":
            raise LauncherError(
                f"--isolation {exc.value} would start Flower's own SuperExec (every app "
                "kind, tokens in argv, no SuperExec secret); the launcher runs --isolation "
                "process"
            ) from None
        raise LauncherError(
            f"--host {exc.value}: Flower's --host/--port is the Runtime API, loopback only"
        ) from None
    if checked.parsed.insecure:
        raise LauncherError("--insecure: the SuperLink's listeners always use TLS")
    return checked.args, checked.secret_file


#: How long the SuperLink's SQLite state waits for its lock (Flower: 5 s). Sites push
#: updates of tens of MB as many objects; on a loaded machine one writer held the lock past
#: 5 s and the ServerApp's pull failed with ``database is locked``.
SQLITE_BUSY_TIMEOUT_MS = 60_000


def lengthen_sqlite_busy_timeout(timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    """Make the SuperLink's SQLite connections wait ``timeout_ms`` for a lock.

    Flower sets ``PRAGMA busy_timeout`` from ``SQLITE_PRAGMAS`` on every new connection
    (``flwr.supercore.sql_mixin``) and offers no option for it; this replaces that tuple's
    entry in this process before any connection is made, and refuses to start when Flower
    no longer sets the pragma that way (so an upgrade cannot silently bring 5 s back).
    """
    import flwr.supercore.sql_mixin as sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple) or not any(
        isinstance(p, tuple) and p[:1] == ("busy_timeout",) for p in pragmas
    ):
        raise LauncherError("Flower's SQLite pragmas moved: cannot set the SuperLink's lock wait")
    patched = tuple(
        ("busy_timeout", str(int(timeout_ms))) if p[0] == "busy_timeout" else p for p in pragmas
    )
    setattr(sql_mixin, "SQLITE_PRAGMAS", patched)  # noqa: B010 (a typed module constant)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the SuperLink until SIGTERM/SIGINT (see the module)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    raw = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = _concord_parser().parse_known_args(raw)
    if flower_args[:1] == ["--"]:
        flower_args = flower_args[1:]
    for switch in LEGACY_GRPC_SWITCHES:
        if os.environ.pop(switch, None) is not None:
            log.warning("%s removed from the environment: no unauthenticated gRPC API", switch)

    made_work_dir = ours.work_dir is None
    work_dir = (
        Path(tempfile.mkdtemp(prefix="concord-superlink-")) if made_work_dir else ours.work_dir
    )
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    bin_dir = work_dir / "bin"
    write_deny_stubs(bin_dir, allowed=frozenset())
    os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", os.defpath)])
    executor: subprocess.Popen[bytes] | None = None
    try:
        checked, secret_file = _checked_flower_args(flower_args, work_dir)
        config = _flower_config(checked)
        if config.superexec_auth_secret is None or config.certificates is None:
            raise LauncherError("Flower did not load the SuperExec secret and TLS files")
        fleet_host, fleet_port = _split_address(ours.fleet_address, "--fleet-address")
        control_host, control_port = _split_address(ours.control_address, "--control-address")
        client_ca = str(ours.control_client_ca or config.ssl_ca_certfile)
        listeners = [
            Listener(
                "runtime", str(config.host), int(config.port), ("runtime", "health"), lifespan=True
            ),
            Listener("fleet", fleet_host, fleet_port, ("fleet", "health")),
            Listener("control", control_host, control_port, ("control",), client_ca),
        ]
        lengthen_sqlite_busy_timeout()
        from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
        from flwr.superlink.main import create_app

        app = create_app(config, SuperLinkLifespan)
        servers = _servers(app, listeners, config)
        runtime_host = f"[{config.host}]" if ":" in str(config.host) else str(config.host)
        executor = subprocess.Popen(
            executor_args(
                runtime_api_address=f"{runtime_host}:{config.port}",
                secret_file=secret_file,
                root_certificates=Path(config.ssl_ca_certfile),
                parent_pid=os.getpid(),
                allow=ours.allow_serverapp,
            )
        )
        asyncio.run(_serve(servers))
        return 0
    finally:
        if executor is not None and executor.poll() is None:
            executor.terminate()
            try:
                executor.wait(10)
            except subprocess.TimeoutExpired:
                executor.kill()
        if made_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
