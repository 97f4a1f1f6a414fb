"""Failure drills: helpers to bring up a real consortium (the demo's processes) and break it.

:class:`DrillStack` wraps :class:`concord_demo.stack.DemoStack` and follows the
demo's story (:mod:`concord_demo.story`): enrol N hospitals (keys, SuperNode, site
agent), publish, submit a small study, approve, exchange keys, start the run. The drills then
kill processes and read the audit log. :func:`start_server_process` runs ``consortium
server`` alone on given settings; :class:`ThrowawayPostgres` is a cluster a drill may stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from concord_demo.stack import (
    RESEARCHER_ORG,
    DemoStack,
    Hospital,
    free_port,
    spawn_server,
)
from concord_demo.story import dataset_governance
from concord_protocol.client import ConsortiumClient
from concord_protocol.processes import ManagedProcess, flower_env

__all__ = [
    "DrillStack",
    "audit_entries",
    "kill_process_group",
    "start_server_process",
    "wait_for",
]

PYTHON_BIN = Path(sys.executable).parent


def wait_for(what: str, check: Callable[[], Any], *, timeout: float, interval: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; that value. ``TimeoutError`` after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def kill_process_group(pid: int) -> None:
    """SIGKILL a process group (a crash, not a shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def audit_entries(client: ConsortiumClient, start: int = 0) -> list[dict[str, Any]]:
    """Every audit entry from index ``start`` to the latest head."""
    head = client.request("GET", "/api/v1/audit/heads/latest")
    return [
        client.request("GET", f"/api/v1/audit/entries/{i}")["entry"]
        for i in range(start, int(head["tree_size"]))
    ]


def start_server_process(
    state: Path, env: dict[str, str], *, port: int | None = None, ready_timeout_s: float = 90
) -> tuple[ManagedProcess, str]:
    """``consortium server`` in a subprocess with ``env`` on top of a clean base; wait for
    ``/readyz`` 200; the process and its base URL."""
    port = port or free_port()
    full = {
        **flower_env(state / "home"),
        "CONCORD_DATA_DIR": str(state / "data"),
        "CONCORD_API__PORT": str(port),
        "CONCORD_POLICY__MEMBER_ORGANISATIONS": '["University of Leiden"]',
        **env,
    }
    url = f"http://127.0.0.1:{port}"
    proc = spawn_server(
        PYTHON_BIN, full, url=url, log_path=state / "server.log", timeout_s=ready_timeout_s
    )
    return proc, url


class DrillStack:
    """A demo consortium of ``n_sites`` hospitals (the demo's processes), driven step by step.

    Hospitals are brought up and approve as in the demo (``DemoStack.bring_up`` and
    ``DemoStack.approve``); the drills then start the run and watch the audit log.
    """

    def __init__(self, state: Path, *, n_sites: int) -> None:
        self.stack = DemoStack(state, n_sites=n_sites, python_bin=PYTHON_BIN)
        self._audit_seen = 0
        self._entries: list[dict[str, Any]] = []

    @property
    def hospitals(self) -> list[Hospital]:
        return self.stack.hospitals

    @classmethod
    @contextlib.contextmanager
    def started(cls, state: Path, *, n_sites: int) -> Iterator[DrillStack]:
        """A started stack (:meth:`start`), stopped on exit whatever happened."""
        stack = cls(state, n_sites=n_sites)
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()

    def start(self) -> None:
        """SuperLink, server, and every hospital enrolled with its SuperNode and agent."""
        stack = self.stack
        stack.prepare()
        stack.start_superlink()
        stack.start_server()
        self.admin = stack.client(
            stack.token("olga-operator", ["consortium_admin"], "Consortium office")
        )
        self.researcher = stack.client(
            stack.token("rita-researcher", ["researcher"], RESEARCHER_ORG)
        )
        self.compliance = stack.client(
            stack.token("carla-compliance", ["compliance_officer"], "Consortium office")
        )
        head_key = stack.head_key()
        for hospital in self.hospitals:
            dataset = {
                "id": hospital.dataset_id,
                "kind": "demo_breast_cancer",
                "site_index": hospital.index,
                "n_sites": len(self.hospitals),
            }
            stack.bring_up(
                hospital,
                self.admin,
                dataset=dataset,
                governance=dataset_governance(hospital),
                head_key=head_key,
            )
        # Each hospital pins the others' keys, as stewards do after comparing fingerprints
        # out of band (site-node peers pin): approvals and key relay need the pins.
        stack.pin_peers()

    def contract(
        self, *, rounds: int, round_timeout_s: int, scheme: str = "ckks"
    ) -> dict[str, Any]:
        """A small DP + CKKS study of the tabular MLP over every hospital's dataset
        (``scheme``: the ciphertext format, ``ckks`` or ``ckks_seeded``)."""
        return {
            "title": "Failure drill",
            "description": "Federated classifier across the drill's hospitals, DP-SGD + CKKS.",
            "purpose": "diagnostic_research",
            "ethics_reference": "IRB-2026-0142",
            "datasets": [h.dataset_id for h in self.hospitals],
            "model": {"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
            "training": {
                "rounds": rounds,
                "local_epochs": 1,
                "batch_size": 32,
                # Features in [-1, 1] from declared ranges; at 0.5 one run in 30 of three DP
                # rounds stayed under majority + 0.15 accuracy, at 1.0 none in 80.
                "learning_rate": 1.0,
                "optimizer": "sgd",
            },
            "privacy": {"epsilon": 6.0, "delta": 1e-5, "max_grad_norm": 1.0},
            "federation": {"min_sites": 3, "round_timeout_s": round_timeout_s},
            "encryption": {"enabled": True, "scheme": scheme},
        }

    def submit_and_start(self, contract: dict[str, Any]) -> dict[str, Any]:
        """Submit, approve everywhere (site policy checked), wait for the key exchange,
        start the run."""
        from site_node.federation.approvals import ApprovalStore

        study: dict[str, Any] = self.researcher.submit_study(contract)
        if study["state"] != "awaiting_approvals":
            raise RuntimeError(f"the study was {study['state']}: {study.get('state_reason')}")
        for hospital in self.hospitals:
            self.stack.approve(hospital, study, reason="Approved for the failure drill.")
        wait_for(
            "every site to hold the study key",
            lambda: all(ApprovalStore(h.state_dir).study_key(study["id"]) for h in self.hospitals),
            timeout=120,
        )
        self.researcher.request("POST", f"/api/v1/studies/{study['id']}/run")
        return study

    def new_entries(self) -> list[dict[str, Any]]:
        """Audit entries appended since the last call (all of them are kept in ``entries``)."""
        fresh = audit_entries(self.compliance, self._audit_seen)
        self._audit_seen += len(fresh)
        self._entries.extend(fresh)
        return fresh

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self._entries

    def round_entries(self, study_id: str) -> list[dict[str, Any]]:
        """``round.completed`` / ``round.failed`` entries of the study, in order."""
        self.new_entries()
        return [
            e
            for e in self._entries
            if e["object"]["id"] == study_id and e["action"].startswith("round.")
        ]

    def wait_for_round(self, study_id: str, n: int, *, timeout: float) -> dict[str, Any]:
        """Wait until the study's ``n``-th round entry is in the log; that entry."""

        def check() -> dict[str, Any] | None:
            rounds = self.round_entries(study_id)
            if len(rounds) >= n:
                return rounds[n - 1]
            study = self.researcher.get_study(study_id)
            if study["state"] in ("completed", "failed", "aborted"):
                # The round's entry and the study's end can land between the two reads:
                # look once more before calling the round missing.
                rounds = self.round_entries(study_id)
                if len(rounds) >= n:
                    return rounds[n - 1]
                raise AssertionError(
                    f"the study ended {study['state']} after {len(rounds)} round(s): "
                    f"{study.get('state_reason')}"
                )
            return None

        return wait_for(f"round {n} of {study_id}", check, timeout=timeout, interval=1.0)

    def wait_for_end(self, study_id: str, *, timeout: float) -> dict[str, Any]:
        """Wait until the study is completed, failed or aborted; the study."""

        def check() -> dict[str, Any] | None:
            study = self.researcher.get_study(study_id)
            return study if study["state"] in ("completed", "failed", "aborted") else None

        return wait_for(f"the end of {study_id}", check, timeout=timeout, interval=1.0)

    def kill_supernode(self, hospital: Hospital) -> None:
        """Crash the hospital's SuperNode (SIGKILL to its process group)."""
        assert hospital.supernode is not None
        kill_process_group(hospital.supernode.proc.pid)
        hospital.supernode.stop()

    def wait_for_supernode_round(self, hospital: Hospital, study_id: str, n: int) -> None:
        """Wait until the hospital's SuperNode has received a message of round ``n``."""
        assert hospital.supernode is not None
        marker = f"ROUND {study_id}/{n}]"
        wait_for(
            f"{hospital.site_id} to receive round {n}",
            lambda: marker in hospital.supernode.log_tail(1_000_000),  # type: ignore[union-attr]
            timeout=180,
        )

    def kill_consortium(self) -> None:
        """Crash the consortium's machine: SIGKILL the server and the SuperLink (whose
        process group holds the ServerApp of the running study)."""
        stack = self.stack
        assert stack.server is not None
        assert stack.link is not None
        assert stack.link.process is not None
        for proc in (stack.server, stack.link.process):
            kill_process_group(proc.proc.pid)
            proc.stop()

    def restart_consortium(self) -> None:
        """Start the SuperLink and the server again on their state (database, keys, TLS)."""
        self.stack.start_superlink(restart=True)
        self.stack.start_server()

    def logs(self) -> str:
        """The server's log tail (for failure messages)."""
        return self.stack.server.log_tail() if self.stack.server is not None else ""

    def stop(self) -> None:
        self.stack.stop()


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (trust auth, loopback, a free port) in a temp dir,
    run as the ``postgres`` user; :meth:`stop` / :meth:`start` restart it under load."""

    def __init__(self) -> None:
        import glob
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="concord-drill-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        import subprocess

        command = ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stdout}\n{result.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:

        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
