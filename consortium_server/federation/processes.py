"""Run the federation on the consortium side: SuperLink process, SuperNode registration, runs.

* :func:`start_superlink`: ``flower-superlink`` with TLS, SuperNode authentication and
  runtime dependency installation disabled (so Flower never runs ``uv sync``).
* :func:`write_connection`: the ``$FLWR_HOME/config.toml`` that the ``flwr`` CLI reads.
* :func:`register_supernode` / :func:`unregister_supernode`: ``flwr supernode register
  KEY.pub CONNECTION`` (only registered SuperNode keys may connect) and its inverse.
* :func:`start_study_run` / :func:`run_study`: ``flwr run`` of the Concord app bundle with
  the study's :class:`RunPlan` (contract, contract hash, public context, ...) as run config,
  then wait for the ServerApp's outcome (per-round records and the encrypted final model).

Every Flower process gets :data:`concord_protocol.processes.FLOWER_ENV` (no telemetry, no
update check, no runtime dependency installation).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
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
from consortium_server.federation.serverapp import read_outcome
from consortium_server.federation.strategy import RunPlan, StudyOutcome

log = logging.getLogger("concord.federation")

__all__ = [
    "SuperLinkHandle",
    "TlsFiles",
    "register_supernode",
    "run_status",
    "run_study",
    "start_study_run",
    "start_superlink",
    "unregister_supernode",
    "wait_for_outcome",
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
) -> SuperLinkHandle:
    """Start ``flower-superlink`` (TLS, SuperNode auth, no runtime installs) on ``port``."""
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
    proc = spawn("superlink", args, env=flower_env(flwr_home), log_path=work_dir / "superlink.log")
    try:
        wait_for_port(host, port, timeout=startup_timeout, proc=proc.proc)
    except FlowerProcessError as exc:
        proc.stop()
        raise FlowerProcessError(str(exc), proc.log_tail()) from None
    address = f"{host}:{port}"
    write_connection(flwr_home, connection, address, root_certificates=tls.ca_cert)
    return SuperLinkHandle(proc, address, flwr_home, connection)


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


def start_study_run(link: SuperLinkHandle, app_dir: Path, plan: RunPlan, work_dir: Path) -> int:
    """``flwr run`` the app bundle in ``app_dir`` with ``plan`` as run config; the run id."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_file = work_dir / f"run-config-{plan.study_id}.toml"
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


def wait_for_outcome(
    records_dir: Path, *, timeout: float, link: SuperLinkHandle | None = None
) -> StudyOutcome:
    """Wait for the ServerApp's outcome file in ``records_dir``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = read_outcome(records_dir)
        if outcome is not None:
            return outcome
        if link is not None and link.process is not None and not link.process.alive():
            raise FlowerProcessError("the SuperLink exited", link.process.log_tail())
        time.sleep(0.5)
    raise FlowerProcessError(
        f"no outcome in {records_dir} after {timeout:.0f}s",
        link.process.log_tail() if link is not None and link.process is not None else "",
    )


def run_study(
    link: SuperLinkHandle,
    plan: RunPlan,
    *,
    app_dir: Path,
    work_dir: Path,
    timeout: float | None = None,
) -> StudyOutcome:
    """Run one study to its end on a running SuperLink and return its outcome.

    ``plan.records_dir`` must be set (the ServerApp writes round records there). The
    default timeout is rounds x (round timeout x 2 + 60 s) plus the node wait.
    """
    if plan.records_dir is None:
        raise ValueError("plan.records_dir is required")
    start_study_run(link, app_dir, plan, work_dir)
    limit = timeout or plan.rounds * (2 * plan.round_timeout_s + 60) + plan.node_wait_s
    return wait_for_outcome(plan.records_dir, timeout=limit, link=link)
