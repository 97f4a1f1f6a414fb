"""Run the federation on the consortium side: SuperLink process, SuperNode registration, runs.

* :func:`start_superlink`: Concord's SuperLink (:mod:`~consortium_server.federation.
  superlink_launcher`): Flower's own app with TLS, SuperNode authentication and runtime
  dependency installation disabled (so Flower never runs ``uv sync``), served so that the
  Fleet API alone is on the port sites dial; Control on a second port that requires a
  client certificate (mutual TLS); the Runtime API on loopback, with ``--isolation
  process``, a SuperExec secret and Concord's ServerApp executor (ServerApp tasks only,
  Concord's bundle only, tokens by file).
* :func:`write_connection`: the ``$FLWR_HOME/config.toml`` that the ``flwr`` CLI reads (for
  a stock SuperLink; Concord's Control listener refuses the CLI, which cannot present a
  client certificate).
* :func:`register_supernode` / :func:`unregister_supernode`: Control ``RegisterNode`` of a
  SuperNode's OpenSSH EC key (only registered SuperNode keys may connect) and its inverse.
* :func:`start_study_run`, :func:`run_status`, :func:`stop_run`: Control ``StartRun`` of
  the Concord app bundle with the study's :class:`RunPlan` (contract, contract hash, public
  context, attempt, ...) as run config, ``ListRuns`` and ``StopRun``. The ServerApp
  reports every round to the consortium server's internal API (:func:`serverapp_env` is
  what the SuperLink's environment must hold for that). :func:`start_run` starts any
  bundle with any run config (benchmarks, tests).

Every Control call goes through :mod:`~consortium_server.federation.control_client`
(Flower's Python Control client with this server's client certificate); every Flower
process gets :data:`concord_protocol.processes.FLOWER_ENV` (no telemetry, no update check,
no runtime dependency installation).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
import tomli_w

from concord_protocol.processes import (
    FlowerProcessError,
    ManagedProcess,
    flower_env,
    spawn,
    wait_for_port,
)
from consortium_server.federation import control_client
from consortium_server.federation.control_client import ControlEndpoint
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.superlink_launcher import launcher_args

log = logging.getLogger("concord.federation")

__all__ = [
    "ControlEndpoint",
    "SuperLinkHandle",
    "TlsFiles",
    "register_supernode",
    "run_status",
    "serverapp_env",
    "start_run",
    "start_study_run",
    "start_superlink",
    "stop_run",
    "unregister_supernode",
    "write_connection",
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the SuperLink's TLS: the CA that sites trust, the server cert and key,
    and the consortium server's client certificate and key for the Control listener."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass
class SuperLinkHandle:
    """A SuperLink: the Fleet address sites dial, and how the server reaches its Control API.

    ``process`` is set when this program started the SuperLink; a connection to one run
    elsewhere (the consortium cluster's) has none. ``control`` is the Control listener and
    the client certificate for it; without one, the ``flwr`` connection in ``flwr_home``
    (address and CA, no client certificate) is used.
    """

    process: ManagedProcess | None
    address: str
    flwr_home: Path
    connection: str
    control: ControlEndpoint | None = None

    def stop(self) -> int | None:
        """Stop the SuperLink (and the ServerApp processes it started), if we started it."""
        return self.process.stop() if self.process is not None else None

    def control_endpoint(self) -> ControlEndpoint:
        """Where and how to reach the Control API."""
        if self.control is not None:
            return self.control
        try:
            body = tomli.loads((self.flwr_home / "config.toml").read_text())
            conn: dict[str, Any] = body["superlink"][self.connection]
        except (OSError, KeyError, tomli.TOMLDecodeError):
            raise FlowerProcessError(
                f"no Control endpoint and no flwr connection {self.connection!r}"
            ) from None
        root = conn.get("root-certificates")
        return ControlEndpoint(
            address=str(conn["address"]),
            ca_cert=Path(root) if root else None,
            insecure=bool(conn.get("insecure", False)),
        )


def write_connection(
    flwr_home: Path, name: str, address: str, *, root_certificates: Path | None
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection (the default)."""
    conn: dict[str, object] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_superlink(
    work_dir: Path,
    *,
    port: int,
    tls: TlsFiles,
    host: str = "127.0.0.1",
    connection: str = "concord",
    supernode_auth: bool = True,
    startup_timeout: float = 60.0,
    extra_env: dict[str, str] | None = None,
    control_port: int | None = None,
    runtime_port: int | None = None,
    serverapp_bundles: Mapping[str, str] | None = None,
) -> SuperLinkHandle:
    """Start Concord's SuperLink: Fleet alone on ``host:port`` (what sites dial), Control
    on ``host:control_port`` (mutual TLS: ``tls.client_cert`` is the server's client
    certificate), the Runtime API on ``127.0.0.1:runtime_port`` (free ports when None).

    ``extra_env`` goes to the SuperLink and so to the ServerApps it starts: the
    ``CONCORD_SERVERAPP_*`` settings (:func:`serverapp_env`). ``serverapp_bundles`` maps
    extra bundle hashes to the ServerApp each may run (default: Concord's bundle only).
    """
    flwr_home = work_dir / "flwr-home"
    control_port = control_port or _free_port(host)
    runtime_port = runtime_port or _free_port("127.0.0.1")
    flower_args = [
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
        "--database",
        str(work_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(work_dir / "launcher" / "superexec.secret"),
    ]
    if supernode_auth:
        flower_args.append("--enable-supernode-auth")
    args = launcher_args(
        fleet_address=f"{host}:{port}",
        control_address=f"{host}:{control_port}",
        flower_args=flower_args,
        allow_serverapp=[f"{h}={ref}" for h, ref in (serverapp_bundles or {}).items()],
        work_dir=work_dir / "launcher",
    )
    from concord_protocol.superexec import ensure_secret_file

    ensure_secret_file(work_dir / "launcher" / "superexec.secret")
    env = {**flower_env(flwr_home), **(extra_env or {})}
    proc = spawn("superlink", args, env=env, log_path=work_dir / "superlink.log")
    try:
        for listening in (port, control_port):
            wait_for_port(host, listening, timeout=startup_timeout, proc=proc.proc)
        wait_for_port("127.0.0.1", runtime_port, timeout=startup_timeout, proc=proc.proc)
    except FlowerProcessError as exc:
        proc.stop()
        raise FlowerProcessError(str(exc), proc.log_tail()) from None
    address = f"{host}:{port}"
    control = ControlEndpoint(
        address=f"{host}:{control_port}",
        ca_cert=tls.ca_cert,
        client_cert=tls.client_cert,
        client_key=tls.client_key,
    )
    write_connection(flwr_home, connection, control.address, root_certificates=tls.ca_cert)
    return SuperLinkHandle(proc, address, flwr_home, connection, control)


def serverapp_env(api_url: str, token_file: Path, *, ca_file: Path | None = None) -> dict[str, str]:
    """The SuperLink's environment for its ServerApps to reach the consortium server
    (:class:`~consortium_server.federation.serverapp_settings.ServerAppSettings`)."""
    env = {"CONCORD_SERVERAPP_API_URL": api_url, "CONCORD_SERVERAPP_TOKEN_FILE": str(token_file)}
    if ca_file is not None:
        env["CONCORD_SERVERAPP_CA_FILE"] = str(ca_file)
    return env


def register_supernode(link: SuperLinkHandle, public_key: Path, *, name: str) -> dict[str, object]:
    """Register a SuperNode public key (OpenSSH EC) with the SuperLink; ``{"success": True,
    "node-id": "<id>"}`` as ``flwr supernode register --format json`` prints it."""
    node_id = control_client.register_node(
        link.control_endpoint(), public_key.read_bytes(), name=name
    )
    return {"success": True, "node-id": str(node_id)}


def unregister_supernode(link: SuperLinkHandle, node_id: str) -> dict[str, object]:
    """Remove a registered SuperNode; ``{"success": True}``."""
    try:
        numeric = int(node_id)
    except ValueError:
        raise FlowerProcessError(f"not a SuperNode id: {node_id!r}") from None
    control_client.unregister_node(link.control_endpoint(), numeric)
    return {"success": True}


def start_run(link: SuperLinkHandle, app_dir: Path, run_config: Mapping[str, Any]) -> int:
    """Start a run of the bundle in ``app_dir`` with ``run_config``; the run id."""
    return control_client.start_run(link.control_endpoint(), app_dir, run_config)


def start_study_run(link: SuperLinkHandle, app_dir: Path, plan: RunPlan) -> int:
    """Start a run of the app bundle in ``app_dir`` with ``plan`` as run config; the run id."""
    return start_run(link, app_dir, plan.to_run_config())


def run_status(link: SuperLinkHandle, run_id: int) -> str | None:
    """The run's status on the SuperLink (``pending``, ``starting``, ``running``,
    ``finished:completed|failed|stopped``), or ``None`` if the SuperLink does not know it."""
    try:
        return control_client.run_status_text(link.control_endpoint(), run_id)
    except FlowerProcessError as exc:
        log.warning("could not read the status of run %s: %s", run_id, exc)
        return None


def stop_run(link: SuperLinkHandle, run_id: int) -> None:
    """Ask the SuperLink to stop a run; a run already over is not an error."""
    try:
        control_client.stop_run(link.control_endpoint(), run_id)
    except FlowerProcessError as exc:
        log.warning("could not stop run %s: %s", run_id, exc)
