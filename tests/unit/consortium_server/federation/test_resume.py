"""Restarting a study whose ServerApp went silent (its SuperLink or pod crashed mid-study).

Each round's encrypted aggregate is kept in the database before the round is recorded; the
run manager replaces a silent attempt by a new one that starts after the last recorded
round, from that round's checkpoint; sites answer a repeated round from their reply cache
(no second privacy spend); a report from the replaced attempt is refused and never
recorded; exactly one replica restarts a study; a study that keeps failing to progress is
failed after ``max_restarts``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.app import Context, Message

from concord_protocol.errors import WireFormatError
from concord_protocol.fields import utcnow
from consortium_server.db.session import session_scope
from consortium_server.federation.checkpoints import (
    KEEP,
    get_checkpoint,
    pack_blobs,
    pack_checkpoint,
    store_checkpoint,
    unpack_blobs,
)
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.runs import RunManager
from consortium_server.federation.serverapp import run_gated, run_study_rounds
from consortium_server.federation.study_runs import current_run
from site_node.crypto import EncodedUpdate
from site_node.federation.approvals import ApprovalStore
from site_node.federation.replies import ReplyCache
from tests.support.flower import SiteFixture, approve_relayed, make_site
from tests.support.inprocess_grid import InProcessGrid, flower_task_identity, site_contexts
from tests.support.runs import (
    InProcessLauncher,
    begin,
    federation_gate,
    federation_token,
    synthetic_run,
)
from tests.support.studies import (
    audit_actions,
    final_aggregate,
    relay_study_key,
    submit_and_approve,
)
from tests.support.world import People

LATER = timedelta(seconds=3600)


def _manager(app: FastAPI, launcher: InProcessLauncher, **kwargs: object) -> RunManager:
    """A run manager that started an hour ago (so its sweeps may restart at once)."""
    return RunManager(
        app.state.sessionmaker,
        app.state.audit_log,
        launcher,
        policy=app.state.policy_context,
        started_at=utcnow() - LATER,
        **kwargs,  # type: ignore[arg-type]
    )


def _study(client: TestClient, people: People, study_id: str) -> dict[str, object]:
    body: dict[str, object] = client.get(
        f"/api/v1/studies/{study_id}", headers=people.researcher
    ).json()
    return body


# --- checkpoints in the database -----------------------------------------------------------


def test_checkpoints_round_trip_and_only_the_newest_are_kept(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"])
    models = [final_aggregate(plan, secret, n) for n in (1, 2, 3)]
    with session_scope(app.state.sessionmaker) as session:
        for model in models:
            store_checkpoint(session, study["id"], model)
    with session_scope(app.state.sessionmaker) as session:
        assert get_checkpoint(session, study["id"], 1) is None  # KEEP newest rounds only
        for model in models[-KEEP:]:
            row = get_checkpoint(session, study["id"], model.round_number)
            assert row is not None
            assert row.model() == model
        row = get_checkpoint(session, study["id"], 3)
        assert row is not None
        row.blobs = row.blobs[:-1] + bytes([row.blobs[-1] ^ 0xFF])  # a flipped bit
        with pytest.raises(WireFormatError, match="corrupt"):
            row.model()
        session.rollback()


def test_a_checkpoint_must_be_an_update_with_its_digest(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"])
    model = final_aggregate(plan, secret, 1)
    with session_scope(app.state.sessionmaker) as session:
        with pytest.raises(WireFormatError):
            store_checkpoint(session, study["id"], replace(model, digest="00" * 32))
        with pytest.raises(WireFormatError):
            store_checkpoint(session, study["id"], replace(model, blobs=model.blobs[:-1]))
    assert unpack_blobs(pack_blobs([b"a", b"", b"bc"])) == [b"a", b"", b"bc"]
    with pytest.raises(WireFormatError):
        unpack_blobs(pack_blobs([b"abc"])[:-1])


# --- the ServerApp and the sites across a crash -----------------------------------------------


class CrashError(Exception):
    """The consortium's SuperLink went away (with the ServerApp in it)."""


class CrashingGrid(InProcessGrid):
    """Delivers messages to the real ClientApp; dies right after the sites answered the
    ``train`` of ``crash_round`` (their replies are lost with the run)."""

    def __init__(self, contexts: dict[int, Context], crash_round: int) -> None:
        super().__init__(contexts)
        self.crash_round = crash_round

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        first = messages[0]
        if first.metadata.message_type == "train" and first.metadata.group_id.endswith(
            f"/{self.crash_round}"
        ):
            raise CrashError
        return replies


@pytest.fixture
def task_identity() -> Iterator[None]:
    with flower_task_identity():
        yield


def _dp_rounds(site: SiteFixture, study_id: str, contract_hash: str) -> int:
    path = ApprovalStore(site.state_dir).dp_state_path(study_id, contract_hash)
    return int(json.loads(path.read_text())["rounds_completed"])


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_a_run_killed_mid_round_restarts_from_its_checkpoint_without_spending_twice(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    """Round 2's training happened at the sites, then the SuperLink died before the round
    was aggregated. The run manager finds the attempt silent and starts a new one at round
    2 from round 1's checkpoint, which the new ServerApp fetches from the server; the sites
    answer round 2 from their reply cache (their accountants stay at 2 rounds), and round 3
    still fits the privacy plan. Each round is recorded once."""
    study = submit_and_approve(
        client,
        consortium,
        purpose="method_development",
        training={"rounds": 3, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.1},
        privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
        model={"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
    )
    secret = relay_study_key(app, study)
    sites = [make_site(tmp_path / "sites", i) for i in range(3)]
    approve_relayed(sites, study, secret)

    plan = replace(begin(app, study["id"], policy=app.state.policy_context), node_wait_s=0.0)
    crashing = CrashingGrid(site_contexts(sites, plan.to_run_config()), crash_round=2)
    with pytest.raises(CrashError):
        run_study_rounds(crashing, plan, gate=federation_gate(app, client, plan))  # type: ignore[arg-type]
    assert _study(client, consortium, study["id"])["current_round"] == 1
    assert [_dp_rounds(s, study["id"], study["contract_hash"]) for s in sites] == [2, 2, 2]
    trained_before_crash = {
        s.site_id: EncodedUpdate.from_bytes_list(
            list(ReplyCache(s.state_dir, study["id"], study["contract_hash"])._read().blobs)
        ).header.digest
        for s in sites
    }

    grids: list[InProcessGrid] = []

    def run(new_plan: RunPlan) -> None:
        new_plan = replace(new_plan, node_wait_s=0.0)
        grid = InProcessGrid(site_contexts(sites, new_plan.to_run_config()))
        grids.append(grid)
        run_gated(grid, new_plan, federation_gate(app, client, new_plan))  # type: ignore[arg-type]

    launcher = InProcessLauncher(run)
    assert _manager(app, launcher).sweep(now=utcnow() + LATER) == [study["id"]]
    launcher.join(300)
    (restarted,) = launcher.started
    assert restarted.start_round == 2
    assert restarted.attempt != plan.attempt
    final = _study(client, consortium, study["id"])
    assert final["state"] == "completed", final["state_reason"]
    assert [_dp_rounds(s, study["id"], study["contract_hash"]) for s in sites] == [3, 3, 3]
    actions = audit_actions(app, study["id"])
    assert actions.count("round.completed") == 3
    assert "study.run_resumed" in actions
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        round_two = [
            e.entry.details["record"]
            for i in range(log.size(session=session))
            if (e := log.get_entry(i, session=session)).entry.action == "round.completed"
            and e.entry.details["record"]["round_number"] == 2
        ]
    assert [r["site_digests"] for r in round_two] == [trained_before_crash]
    waves = [k for i, k in enumerate(grids[0].sent) if i == 0 or grids[0].sent[i - 1] != k]
    assert waves == ["train", "evaluate", "train", "evaluate"]


def test_a_restart_without_the_checkpoint_of_the_round_before_stops_and_says_so(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"])
    synthetic_run(federation_gate(app, client, plan), [1.0], secret=secret)
    asked_for_round_three = replace(plan, start_round=3)
    gate = federation_gate(app, client, asked_for_round_three)
    with pytest.raises(RuntimeError, match="no checkpoint of round 2"):
        run_gated(InProcessGrid({}), asked_for_round_three, gate)  # type: ignore[arg-type]
    assert "study.run_interrupted" in audit_actions(app, study["id"])
    with pytest.raises(ValueError, match="start_round"):
        replace(plan, start_round=5)


# --- the run manager's sweep -----------------------------------------------------------------


def _running(client: TestClient, people: People, app: FastAPI) -> tuple[str, RunPlan, bytes]:
    study = submit_and_approve(client, people)
    secret = relay_study_key(app, study)
    plan = begin(app, study["id"], policy=app.state.policy_context)
    synthetic_run(federation_gate(app, client, plan), [0.5], secret=secret)  # round 1 recorded
    return study["id"], plan, secret


def test_a_silent_run_is_replaced_once_and_its_late_reports_are_refused(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, old, secret = _running(client, consortium, app)
    launcher = InProcessLauncher(lambda plan: None)
    manager = _manager(app, launcher)
    assert manager.sweep() == []  # heard from a moment ago: alive
    later = utcnow() + LATER
    assert manager.sweep(now=later) == [study_id]
    assert manager.sweep(now=later) == []  # the new attempt counts as heard from
    (new,) = launcher.started
    assert (new.start_round, new.study_id) == (2, study_id)
    assert new.attempt != old.attempt
    # The replaced attempt wakes up and reports round 2: refused, not recorded.
    _late, (verdict,) = synthetic_run(
        federation_gate(app, client, old), [1.0], secret=secret, first_round=2
    )
    assert verdict.action == "stop"
    assert "replaced" in verdict.reason
    assert _study(client, consortium, study_id)["current_round"] == 1
    # The new attempt goes on from round 2 to the end.
    _, verdicts = synthetic_run(federation_gate(app, client, new), [1.0, 1.5], secret=secret)
    assert [v.action for v in verdicts] == ["continue", "stop"]
    assert _study(client, consortium, study_id)["state"] == "completed"
    actions = audit_actions(app, study_id)
    assert actions.count("round.completed") == 3
    assert actions.count("study.run_resumed") == 1


def test_a_freshly_started_server_waits_for_live_runs_to_reach_it(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, _, _ = _running(client, consortium, app)
    launcher = InProcessLauncher(lambda plan: None)
    manager = RunManager(app.state.sessionmaker, app.state.audit_log, launcher, liveness_s=30)
    assert manager.sweep(now=utcnow() + timedelta(seconds=10)) == []
    assert launcher.started == []
    assert manager.sweep(now=utcnow() + timedelta(seconds=31)) == [study_id]


def test_a_failure_report_lets_the_next_sweep_restart_at_once(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, plan, _ = _running(client, consortium, app)
    federation_gate(app, client, plan).failure("RuntimeError: grid lost")
    launcher = InProcessLauncher(lambda p: None)
    assert _manager(app, launcher).sweep() == [study_id]
    assert "study.run_interrupted" in audit_actions(app, study_id)


def test_two_replicas_sweeping_at_once_restart_a_study_once(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, _, _ = _running(client, consortium, app)
    launchers = [InProcessLauncher(lambda p: None) for _ in range(2)]
    managers = [_manager(app, launcher) for launcher in launchers]
    later = utcnow() + LATER
    results: list[list[str]] = []
    barrier = threading.Barrier(2)

    def sweep(manager: RunManager) -> None:
        barrier.wait()
        results.append(manager.sweep(now=later))

    threads = [threading.Thread(target=sweep, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(len(r) for r in results) == [0, 1]
    assert sum(len(launcher.started) for launcher in launchers) == 1
    assert audit_actions(app, study_id).count("study.run_resumed") == 1


def test_a_study_whose_next_round_the_policy_now_denies_is_failed_not_restarted(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, _, _ = _running(client, consortium, app)
    files = dict(client.get("/api/v1/policy", headers=consortium.admin).json()["files"])
    files["freeze.cedar"] = (
        '@id("freeze.rounds")\n@reason("Training is paused for a security review.")\n'
        'forbid (principal, action == Concord::Action::"RunRound", resource);\n'
    )
    assert (
        client.post("/api/v1/policy", json={"files": files}, headers=consortium.admin).status_code
        == 201
    )
    launcher = InProcessLauncher(lambda p: None)
    assert _manager(app, launcher).sweep(now=utcnow() + LATER) == []
    assert launcher.started == []
    final = _study(client, consortium, study_id)
    assert final["state"] == "failed"
    assert "paused for a security review" in str(final["state_reason"])


def test_a_run_that_never_makes_progress_is_failed_after_max_restarts(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, _, _ = _running(client, consortium, app)
    launcher = InProcessLauncher(lambda p: None)  # its runs never report anything
    manager = _manager(app, launcher, max_restarts=2)
    when = utcnow()
    for _ in range(3):
        when += LATER
        manager.sweep(now=when)
    assert len(launcher.started) == 2
    assert launcher.stopped == [1, 2]  # each replaced run was stopped on the SuperLink
    final = _study(client, consortium, study_id)
    assert final["state"] == "failed"
    assert "restarted 2 times" in str(final["state_reason"])


def test_only_running_studies_are_swept(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study = submit_and_approve(client, consortium)
    relay_study_key(app, study)
    launcher = InProcessLauncher(lambda p: None)
    assert _manager(app, launcher).sweep(now=utcnow() + LATER) == []
    with app.state.sessionmaker() as session:
        assert current_run(session, study["id"]) is None


def test_an_aggregate_is_kept_only_for_the_next_round(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    study_id, plan, secret = _running(client, consortium, app)
    skipped = final_aggregate(plan, secret, 3)
    response = client.put(
        f"/internal/v1/federation/studies/{study_id}/runs/{plan.attempt}/rounds/3/checkpoint",
        params={"total_weight": 300.0},
        content=pack_checkpoint(skipped),
        headers={
            "Authorization": f"Bearer {federation_token(app)}",
            "Content-Type": "application/vnd.concord.blobs",
        },
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "federation.round_out_of_order"
