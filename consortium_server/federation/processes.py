"""Run the federation on the consortium side: SuperLink process, SuperNode registration, runs.

* :func:`start_superlink`: ``flower-superlink`` with TLS, SuperNode authentication and
  runtime dependency installation disabled (so Flower never runs ``uv sync``).
* :func:`write_connection`: the ``$FLWR_HOME/config.toml`` that the ``flwr`` CLI reads.
* :func:`register_supernode` / :func:`unregister_supernode`: ``flwr supernode register
  KEY.pub CONNECTION`` (only registered SuperNode keys may connect) and its inverse.
* :func:`start_study_run`, :func:`run_status`, :func:`stop_run`: ``flwr run`` of the
  Concord app bundle with the study's :class:`RunPlan` (contract, contract hash, public
  context, attempt, ...) as run config, ``flwr ls`` and ``flwr stop``. The ServerApp
  reports every round to the consortium server's internal API (:func:`serverapp_env` is
  what the SuperLink's environment must hold for that).

Every Flower process gets :data:`concord_protocol.processes.FLOWER_ENV` (no telemetry, no
update check, no runtime dependency installation).
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from concord_protocol.processes import (
    FlowerProcessError,
    ManagedProcess,
    flower_env,
    flwr_binary,
    spawn,
    wait_for_port,
)
from consortium_server.federation.plan import RunPlan

log = logging.getLogger("concord.federation")

__all__ = [
    "SuperLinkHandle",
    "TlsFiles",
    "register_supernode",
    "run_status",
    "serverapp_env",
    "start_study_run",
    "start_superlink",
    "stop_run",
    "unregister_supernode",
    "write_connection",
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the SuperLink's TLS: the CA that sites trust, the server cert and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class SuperLinkHandle:
    """A SuperLink and the ``flwr`` CLI connection that reaches it.

    ``process`` is set when this program started the SuperLink; a connection to one run
    elsewhere (the consortium cluster's) has none.
    """

    process: ManagedProcess | None
    address: str
    flwr_home: Path
    connection: str

    def stop(self) -> int | None:
        """Stop the SuperLink (and the ServerApp processes it started), if we started it."""
        return self.process.stop() if self.process is not None else None


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
) -> SuperLinkHandle:
    """Start ``flower-superlink`` (TLS, SuperNode auth, no runtime installs) on ``port``.

    ``extra_env`` goes to the SuperLink and so to the ServerApps it starts: the
    ``CONCORD_SERVERAPP_*`` settings (:func:`serverapp_env`).
    """
    flwr_home = work_dir / "flwr-home"
    args = [
        flwr_binary("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
        "--database",
        str(work_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    env = {**flower_env(flwr_home), **(extra_env or {})}
    proc = spawn("superlink", args, env=env, log_path=work_dir / "superlink.log")
    try:
        wait_for_port(host, port, timeout=startup_timeout, proc=proc.proc)
    except FlowerProcessError as exc:
        proc.stop()
        raise FlowerProcessError(str(exc), proc.log_tail()) from None
    address = f"{host}:{port}"
    write_connection(flwr_home, connection, address, root_certificates=tls.ca_cert)
    return SuperLinkHandle(proc, address, flwr_home, connection)


def serverapp_env(api_url: str, token_file: Path, *, ca_file: Path | None = None) -> dict[str, str]:
    """The SuperLink's environment for its ServerApps to reach the consortium server
    (:class:`~consortium_server.federation.serverapp_settings.ServerAppSettings`)."""
    env = {"CONCORD_SERVERAPP_API_URL": api_url, "CONCORD_SERVERAPP_TOKEN_FILE": str(token_file)}
    if ca_file is not None:
        env["CONCORD_SERVERAPP_CA_FILE"] = str(ca_file)
    return env


def _flwr(link: SuperLinkHandle, args: list[str], *, timeout: float = 120.0) -> str:
    result = subprocess.run(
        [flwr_binary("flwr"), *args],
        env=flower_env(link.flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise FlowerProcessError(
            f"flwr {args[0]} {args[1] if len(args) > 1 else ''} failed ({result.returncode})",
            result.stdout + result.stderr,
        )
    return result.stdout


def _json_tail(output: str) -> dict[str, object]:
    start = output.find("{")
    if start < 0:
        raise FlowerProcessError("no JSON in flwr output", output)
    body = json.loads(output[start:])
    if not isinstance(body, dict):
        raise FlowerProcessError("unexpected flwr output", output)
    return body


def register_supernode(link: SuperLinkHandle, public_key: Path, *, name: str) -> dict[str, object]:
    """Register a SuperNode public key (OpenSSH EC) with the SuperLink; return flwr's JSON."""
    out = _flwr(
        link,
        [
            "supernode",
            "register",
            str(public_key),
            link.connection,
            "--name",
            name,
            "--format",
            "json",
        ],
    )
    body = _json_tail(out)
    if body.get("success") is False:
        raise FlowerProcessError("SuperNode registration refused", out)
    return body


def unregister_supernode(link: SuperLinkHandle, node_id: str) -> dict[str, object]:
    """Remove a registered SuperNode (``flwr supernode unregister``); flwr's JSON."""
    out = _flwr(link, ["supernode", "unregister", node_id, link.connection, "--format", "json"])
    body = _json_tail(out)
    if body.get("success") is False:
        raise FlowerProcessError("SuperNode unregistration refused", out)
    return body


def start_study_run(link: SuperLinkHandle, app_dir: Path, plan: RunPlan) -> int:
    """``flwr run`` the app bundle in ``app_dir`` with ``plan`` as run config; the run id."""
    with tempfile.TemporaryDirectory(prefix="concord-run-") as tmp:
        config_file = Path(tmp) / "run-config.toml"
        config_file.write_text(tomli_w.dumps(plan.to_run_config()))
        out = _flwr(
            link,
            [
                "run",
                str(app_dir),
                link.connection,
                "--run-config",
                str(config_file),
                "--format",
                "json",
            ],
        )
    body = _json_tail(out)
    run_id = body.get("run-id", body.get("run_id"))
    if body.get("success") is False or run_id is None:
        raise FlowerProcessError("flwr run did not start a run", out)
    return int(str(run_id))


def run_status(link: SuperLinkHandle, run_id: int) -> str | None:
    """The run's status on the SuperLink (``pending``, ``starting``, ``running``,
    ``finished:completed|failed|stopped``), or ``None`` if the SuperLink does not know it."""
    try:
        out = _flwr(link, ["ls", link.connection, "--run-id", str(run_id), "--format", "json"])
    except FlowerProcessError as exc:
        log.warning("could not read the status of run %s: %s", run_id, exc)
        return None
    runs = _json_tail(out).get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[0], dict):
        return None
    status = runs[0].get("status")
    return status if isinstance(status, str) else None


def stop_run(link: SuperLinkHandle, run_id: int) -> None:
    """Ask the SuperLink to stop a run (``flwr stop``); a run already over is not an error."""
    try:
        _flwr(link, ["stop", str(run_id), link.connection, "--format", "json"], timeout=60.0)
    except FlowerProcessError as exc:
        log.warning("could not stop run %s: %s", run_id, exc)
