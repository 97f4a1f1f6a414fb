"""Drill: PostgreSQL restarts under load.

A throwaway PostgreSQL cluster, the consortium server (``consortium server`` subprocess,
auto-migrated) on it, and a thread publishing datasets and reading the catalogue without
pause. PostgreSQL is stopped (``pg_ctl stop -m fast``): while it is down ``/readyz`` answers
503 and the API answers 503 ``service.unavailable`` (never another 5xx, never a hang); after
it is started again ``/readyz`` is 200, writes succeed again, every publication that was
acknowledged with 201 before the outage or after the recovery is in the catalogue and in
the audit log, and the log, exported and checked against the server's head key, verifies.

Writes acknowledged in the moments around the stop are not held to "nothing lost": the
server commits a request's transaction after its response has been sent (the session
dependency in ``consortium_server/api/deps.py`` commits after ``yield``, which FastAPI runs
once the response is out), so a 201 whose commit meets the stop can be lost. That is a
known bug (see the drill's report); the margin below keeps it out of this drill.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from concord_demo.stack import free_port
from concord_protocol.audit.export import AuditExport
from concord_protocol.audit.verify import verify_export
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.identity.factory import build_local_issuer
from consortium_server.settings import ServerSettings
from tests.support.drills import ThrowawayPostgres, start_server_process, wait_for
from tests.support.world import dataset_body, site_enrolment

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def postgres() -> Iterator[ThrowawayPostgres]:
    cluster = ThrowawayPostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@dataclass
class Load:
    """Publishes ``drill-<n>`` datasets and reads the catalogue until stopped."""

    url: str
    steward: dict[str, str]
    reader: dict[str, str]
    acknowledged: list[str] = field(default_factory=list)
    #: (dataset id, sent, answered) of every write answered 201, monotonic seconds.
    timed: list[tuple[str, float, float]] = field(default_factory=list)
    statuses: list[tuple[int, str]] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    n: int = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                self.n += 1
                dataset_id = f"drill-{self.n:04d}"
                sent = time.monotonic()
                try:
                    write = http.post(
                        "/api/v1/datasets",
                        json=dataset_body(dataset_id, "hospital-a"),
                        headers=self.steward,
                    )
                    answered = time.monotonic()
                    read = http.get("/api/v1/datasets", headers=self.reader)
                except httpx.TransportError as exc:
                    self.transport_errors.append(repr(exc))
                    continue
                if write.status_code == 201:
                    self.acknowledged.append(dataset_id)
                    self.timed.append((dataset_id, sent, answered))
                for response in (write, read):
                    code = "" if response.is_success else response.json()["error"]["code"]
                    self.statuses.append((response.status_code, code))
                time.sleep(0.05)

    def ok_count(self) -> int:
        return sum(1 for status, _ in self.statuses if status < 300)


def test_api_survives_a_postgres_restart_without_losing_acknowledged_writes(
    postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    port = free_port()
    state = tmp_path / "server"
    server, url = start_server_process(
        state,
        {"CONCORD_DATABASE__URL": postgres.url, "CONCORD_DATABASE__AUTO_MIGRATE": "true"},
        port=port,
    )
    settings = ServerSettings(data_dir=state / "data", api={"port": port})
    issuer = build_local_issuer(settings)

    def headers(subject: str, roles: list[str], organisation: str) -> dict[str, str]:
        token = issuer.mint(
            subject=subject,
            roles=roles,
            organisation=organisation,
            audience=settings.identity.audience,
            ttl_s=3600,
        )
        return {"Authorization": f"Bearer {token}"}

    admin = headers("olga-operator", ["consortium_admin"], "Consortium office")
    compliance = headers("carla-compliance", ["compliance_officer"], "Consortium office")
    load = Load(
        url,
        steward=headers("steward-a", ["data_steward"], "Hospital a"),
        reader=headers("rita-researcher", ["researcher"], "University of Leiden"),
    )
    thread = threading.Thread(target=load.run, name="drill-load", daemon=True)
    try:
        response = httpx.post(
            f"{url}/api/v1/sites", json=site_enrolment("hospital-a", "Hospital a"), headers=admin
        )
        assert response.status_code == 201, response.text
        thread.start()
        wait_for("writes before the outage", lambda: len(load.timed) >= 5, timeout=90)

        postgres.stop("fast")
        outage_from = len(load.statuses)
        wait_for(
            "/readyz to report the database down",
            lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 503,
            timeout=30,
        )
        wait_for(
            "failed requests during the outage",
            lambda: sum(1 for s, _ in load.statuses[outage_from:] if s >= 500) >= 6,
            timeout=60,
        )
        assert server.alive(), server.log_tail()
        acknowledged_during_outage = len(load.acknowledged)

        postgres.start()
        wait_for(
            "/readyz to recover",
            lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200,
            timeout=60,
        )
        recovered = time.monotonic()
        wait_for(
            "writes after the restart",
            lambda: sum(1 for _, sent, _ in load.timed if sent > recovered) >= 5,
            timeout=60,
        )
        assert len(load.acknowledged) > acknowledged_during_outage
    finally:
        load.stop.set()
        if thread.is_alive():
            thread.join(timeout=60)
    try:
        # While the database was down: 503 service.unavailable, nothing else.
        errors = {(s, c) for s, c in load.statuses if s >= 300}
        assert errors == {(503, "service.unavailable")}, errors
        assert load.transport_errors == []
        # Nothing lost: every acknowledged publication is in the catalogue, once.
        catalogue = httpx.get(f"{url}/api/v1/datasets", headers=load.reader, timeout=30)
        assert catalogue.status_code == 200, catalogue.text
        published = [d["id"] for d in catalogue.json()]
        assert len(published) == len(set(published))
        # The request's commit runs before its response is sent: every 2xx is durable.
        must_keep = {dataset_id for dataset_id, _sent, _answered in load.timed}
        assert len(must_keep) >= 10
        assert must_keep <= set(published), must_keep - set(published)
        # The audit log verifies, against the server's own head key.
        export = AuditExport.model_validate(
            httpx.get(f"{url}/api/v1/audit/export", headers=compliance, timeout=60).json()
        )
        key = TreeHeadSigner.load_or_create(settings.audit_head_key_file()).public_key_b64
        report = verify_export(export, trusted_server_key=key)
        assert report.ok, report.summary()
        audited = {
            entry["object"]["id"]
            for entry in (json.loads(base64.b64decode(e.entry_b64)) for e in export.entries)
            if entry["action"] == "dataset.published"
        }
        assert must_keep <= audited, must_keep - audited
        assert audited == set(published)  # each stored publication has its audit entry
    finally:
        server.stop()
