"""Run leases: one server replica follows each running study; an expired lease is taken
over and the study resumed. On SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.db.base import utcnow
from consortium_server.db.session import session_scope
from consortium_server.federation import leases
from consortium_server.federation.coordinator import begin_run
from consortium_server.federation.runs import RunManager
from consortium_server.federation.strategy import RoundHook, RunPlan, StudyOutcome
from tests.support.studies import (
    audit_actions,
    relay_study_key,
    resuming_runner,
    submit_and_approve,
)
from tests.support.world import People


def _study(client: TestClient, consortium: People, app: FastAPI) -> tuple[str, bytes]:
    study = submit_and_approve(client, consortium)
    return study["id"], relay_study_key(app, study)


def test_a_lease_has_one_holder_until_it_expires(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    sid, _ = _study(client, consortium, app)
    factory = app.state.sessionmaker
    t0 = utcnow()
    with session_scope(factory) as session:
        assert leases.claim(session, sid, "replica-1", ttl_s=30, now=t0)
    with session_scope(factory) as session:
        assert not leases.claim(session, sid, "replica-2", ttl_s=30, now=t0)
        assert leases.claim(session, sid, "replica-1", ttl_s=30, now=t0)  # its own again
        assert leases.renew(session, sid, "replica-1", ttl_s=30, now=t0)
        assert leases.holder_of(session, sid, now=t0) == "replica-1"
    later = t0 + timedelta(seconds=31)
    with session_scope(factory) as session:
        assert leases.holder_of(session, sid, now=later) is None
        assert leases.claim(session, sid, "replica-2", ttl_s=30, now=later)  # expired: taken
        assert not leases.renew(session, sid, "replica-1", ttl_s=30, now=later)  # lost it
        leases.release(session, sid, "replica-1")  # not its lease: no effect
        assert leases.holder_of(session, sid, now=later) == "replica-2"
        leases.release(session, sid, "replica-2")
        assert leases.holder_of(session, sid, now=later) is None


def test_concurrent_claims_have_one_winner(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    sid, _ = _study(client, consortium, app)
    factory = app.state.sessionmaker
    barrier = threading.Barrier(4)
    wins: list[str] = []
    errors: list[BaseException] = []

    def contend(name: str) -> None:
        try:
            barrier.wait(10)
            with session_scope(factory) as session:
                if leases.claim(session, sid, name, ttl_s=30):
                    wins.append(name)
        except BaseException as exc:  # SQLite may refuse a concurrent writer: not a win
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(f"replica-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(wins) == 1, (wins, errors)
    with session_scope(factory) as session:
        assert leases.holder_of(session, sid) == wins[0]


def test_a_study_leased_to_a_live_replica_is_left_alone_until_its_lease_expires(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    sid, secret = _study(client, consortium, app)
    factory, log = app.state.sessionmaker, app.state.audit_log
    with session_scope(factory) as session:
        begin_run(session, sid, log=log, actor=None, records_dir=tmp_path / sid)
        assert leases.claim(session, sid, "replica-1", ttl_s=30)
    started: list[int] = []
    other = RunManager(factory, log, resuming_runner(secret, started), holder="replica-2")

    other.keep_leases(tmp_path)  # replica-1 is alive: nothing to take over
    assert started == []
    assert "study.run_resumed" not in audit_actions(app, sid)

    with session_scope(factory) as session:  # replica-1 died 31 s ago
        lease = session.get(leases.RunLease, sid)
        assert lease is not None
        lease.expires_at = utcnow() - timedelta(seconds=1)
    other.keep_leases(tmp_path)
    assert other.wait(sid, timeout=60).status == "completed"
    assert started == [1]
    final = client.get(f"/api/v1/studies/{sid}", headers=consortium.researcher).json()
    assert final["state"] == "completed"
    assert audit_actions(app, sid).count("study.run_resumed") == 1
    with session_scope(factory) as session:
        assert leases.holder_of(session, sid) is None  # released at the end


def test_starting_a_run_leases_it_to_the_replica_that_follows_it(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    sid, secret = _study(client, consortium, app)
    gate = threading.Event()
    started: list[int] = []
    inner = resuming_runner(secret, started)

    def runner_for(plan: RunPlan) -> Any:
        def run(plan: RunPlan, hook: RoundHook) -> StudyOutcome:
            assert gate.wait(30)
            result: StudyOutcome = inner(plan)(plan, hook)
            return result

        return run

    manager = RunManager(app.state.sessionmaker, app.state.audit_log, runner_for, holder="me")
    app.state.run_manager = manager
    response = client.post(f"/api/v1/studies/{sid}/run", headers=consortium.researcher)
    assert response.status_code == 202, response.text
    with session_scope(app.state.sessionmaker) as session:
        assert leases.holder_of(session, sid) == "me"
    # Another replica's sweep finds the study held: it does not start it a second time.
    other = RunManager(app.state.sessionmaker, app.state.audit_log, runner_for, holder="other")
    assert other.resume_interrupted(Path("/nonexistent")) == []
    gate.set()
    assert manager.wait(sid, timeout=60).status == "completed"
    assert started == [1]
    with session_scope(app.state.sessionmaker) as session:
        assert leases.holder_of(session, sid) is None
