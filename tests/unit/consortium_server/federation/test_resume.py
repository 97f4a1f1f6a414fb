"""Resuming a study after the consortium server (and its SuperLink) stopped mid-study.

The ServerApp keeps a checkpoint of each aggregate; a new run starts after the last
aggregated round; sites answer a repeated round from their reply cache (no second privacy
spend); the runner reports what finished while nobody followed, follows a run that is
still alive, or starts a new one; the consortium side resumes its running studies at
start-up, audited, and never records a round twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.app import Context, Message

from concord_protocol.rounds import RoundRecord
from consortium_server.db.session import session_scope
from consortium_server.federation import runs
from consortium_server.federation.coordinator import begin_run, record_round, resume_run
from consortium_server.federation.processes import SuperLinkHandle
from consortium_server.federation.runs import RUN_FILE, RunManager, superlink_runner
from consortium_server.federation.serverapp import (
    HEARTBEAT_FILE,
    CheckpointError,
    heartbeat,
    last_checkpoint,
    load_checkpoint,
    run_recorded,
    write_checkpoint,
    write_json,
)
from consortium_server.federation.strategy import GlobalModel, RunPlan, StudyOutcome
from site_node.crypto import EncodedUpdate
from site_node.federation.replies import CachedReply, ReplyCache, global_digest
from site_node.training import build_model, num_parameters
from tests.support.flower import (
    SiteFixture,
    approve_everywhere,
    breast_cancer_contract,
    make_site,
)
from tests.support.inprocess_grid import InProcessGrid, flower_task_identity, site_contexts
from tests.support.studies import (
    audit_actions,
    relay_study_key,
    resuming_runner,
    round_record,
    submit_and_approve,
)
from tests.support.world import People

# --- checkpoints ---------------------------------------------------------------------------


def _model(round_number: int, payload: bytes = b"ciphertext") -> GlobalModel:
    return GlobalModel(round_number, (payload, b"\x00" * 10), 300.0, f"{round_number:02d}" * 32)


def test_checkpoints_round_trip_and_only_the_newest_two_are_kept(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        write_checkpoint(tmp_path, _model(n, payload=bytes([n]) * 7))
    assert last_checkpoint(tmp_path) == 3
    assert load_checkpoint(tmp_path, 3) == _model(3, payload=b"\x03" * 7)
    assert load_checkpoint(tmp_path, 2).blobs[0] == b"\x02" * 7
    with pytest.raises(CheckpointError, match="round 1"):
        load_checkpoint(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-0002.blobs",
        "model-0002.json",
        "model-0003.blobs",
        "model-0003.json",
    ]


def test_a_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, _model(1))
    blobs = tmp_path / "model-0001.blobs"
    data = bytearray(blobs.read_bytes())
    data[-1] ^= 0xFF
    blobs.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path, 1)
    blobs.write_bytes(b"\x00\x00")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_checkpoint(tmp_path, 1)


# --- the ServerApp and the sites across a crash -----------------------------------------------


class CrashError(Exception):
    """The consortium's machine went away."""


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


def _dp_rounds(site: SiteFixture, plan: RunPlan) -> int:
    from site_node.federation.approvals import ApprovalStore

    path = ApprovalStore(site.state_dir).dp_state_path(plan.study_id, plan.contract_hash)
    return int(json.loads(path.read_text())["rounds_completed"])


@pytest.mark.slow
@pytest.mark.usefixtures("task_identity")
def test_a_run_killed_mid_round_resumes_from_its_checkpoint_without_spending_twice(
    tmp_path: Path,
) -> None:
    """Round 2's training happened at the sites, then the server died before aggregating.
    The resumed run starts at round 2 from round 1's checkpoint; the sites answer round 2
    from their reply cache (their accountants stay at 2 rounds), and round 3 still fits the
    privacy plan. Without the cache, round 3 would be refused by the sites' accountants."""
    contract = breast_cancer_contract(rounds=3)
    sites = [make_site(tmp_path / "sites", i) for i in range(3)]
    public = approve_everywhere(sites, "study-1", contract)
    n = num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2))
    records = tmp_path / "records"
    plan = RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=n,
        sites=tuple(s.site_id for s in sites),
        public_context=public,
        records_dir=records,
        node_wait_s=0.0,
    )

    with pytest.raises(CrashError):
        run_recorded(CrashingGrid(site_contexts(sites, plan.to_run_config()), crash_round=2), plan)  # type: ignore[arg-type]
    assert last_checkpoint(records) == 1
    assert sorted(p.name for p in records.glob("round-*.json")) == ["round-0001.json"]
    assert [_dp_rounds(s, plan) for s in sites] == [2, 2, 2]
    trained_before_crash = {
        s.site_id: EncodedUpdate.from_bytes_list(
            list(ReplyCache(s.state_dir, plan.study_id, plan.contract_hash)._read().blobs)
        ).header.digest
        for s in sites
    }

    resumed = replace(plan, start_round=2)
    grid = InProcessGrid(site_contexts(sites, resumed.to_run_config()))
    outcome = run_recorded(grid, resumed)  # type: ignore[arg-type]

    assert outcome.status == "completed", outcome.failure
    assert [r.round_number for r in outcome.rounds] == [1, 2, 3]
    assert all(r.participants == [s.site_id for s in sites] for r in outcome.rounds)
    assert [_dp_rounds(s, plan) for s in sites] == [3, 3, 3]
    assert outcome.final_model is not None
    assert outcome.final_model.round_number == 3
    assert json.loads((records / "outcome.json").read_text())["status"] == "completed"
    # Round 2's updates are the ones the sites trained before the crash.
    assert outcome.rounds[1].site_digests == trained_before_crash
    assert grid.sent == ["train"] * 3 + ["evaluate"] * 3 + ["train"] * 3 + ["evaluate"] * 3


def test_a_resumed_run_needs_the_checkpoint_of_the_round_before(tmp_path: Path) -> None:
    contract = breast_cancer_contract(rounds=3, encryption=False)
    plan = RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=10,
        sites=("hospital-a", "hospital-b", "hospital-c"),
        records_dir=tmp_path,
        start_round=3,
    )
    with pytest.raises(CheckpointError, match="round 2"):
        run_recorded(InProcessGrid({}), plan)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_round"):
        replace(plan, start_round=5)
    with pytest.raises(ValueError, match="records_dir"):
        replace(plan, records_dir=None)


# --- the site's reply cache ----------------------------------------------------------------


def test_the_reply_cache_answers_only_the_same_request(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path, "study-1", "ab" * 32)
    digest = global_digest([b"agg"], round_number=1, total_weight=300.0)
    cache.put(CachedReply(2, digest, (b"header", b"chunk"), {"num-examples": 120}))
    hit = cache.get(2, digest)
    assert hit is not None
    assert hit.blobs == (b"header", b"chunk")
    assert hit.metrics == {"num-examples": 120}
    assert cache.get(3, digest) is None
    assert cache.get(2, global_digest([b"other"], round_number=1, total_weight=300.0)) is None
    assert cache.get(2, global_digest([b"agg"], round_number=1, total_weight=301.0)) is None
    assert ReplyCache(tmp_path, "study-2", "ab" * 32).get(2, digest) is None
    assert cache.path.stat().st_mode & 0o777 == 0o600


def test_train_requests_of_a_study_wait_for_each_other(tmp_path: Path) -> None:
    """The lock is held across processes (a resumed run's ClientApp waits for the old one)."""
    import multiprocessing
    import time

    cache = ReplyCache(tmp_path, "study-1", "ab" * 32)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()

    def hold() -> None:
        with ReplyCache(tmp_path, "study-1", "ab" * 32).exclusive():
            ready.set()
            time.sleep(1.0)
            (tmp_path / "first-done").touch()

    child = ctx.Process(target=hold)
    child.start()
    assert ready.wait(30)
    with cache.exclusive():
        assert (tmp_path / "first-done").exists()
    child.join(30)
    assert child.exitcode == 0


def test_an_unreadable_reply_cache_is_a_miss(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path, "study-1", "ab" * 32)
    digest = global_digest(None, round_number=0, total_weight=0.0)
    cache.put(CachedReply(1, digest, (b"x",), {}))
    cache.path.write_bytes(cache.path.read_bytes()[:-3])  # truncated
    assert cache.get(1, digest) is None
    cache.path.write_bytes(b"garbage")
    assert cache.get(1, digest) is None


# --- the runner after a restart ------------------------------------------------------------


@pytest.fixture
def link(tmp_path: Path) -> SuperLinkHandle:
    return SuperLinkHandle(None, "127.0.0.1:1", tmp_path / "flwr-home", "concord")


class FakeSuperLink:
    """Stands in for the ``flwr`` CLI calls the runner makes (run, ls, stop)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, status: str | None = None) -> None:
        self.status = status
        self.started: list[int] = []
        self.stopped: list[int] = []
        self.on_start: Any = None
        monkeypatch.setattr(runs, "run_status", lambda _link, run_id: self.status)
        monkeypatch.setattr(runs, "stop_run", lambda _link, run_id: self.stopped.append(run_id))
        monkeypatch.setattr(runs, "start_study_run", self._start)

    def _start(self, _link: SuperLinkHandle, _app: Path, plan: RunPlan, _work: Path) -> int:
        self.started.append(plan.start_round)
        if self.on_start is not None:
            self.on_start(plan)
        return 42


def _plain_plan(records: Path, *, rounds: int = 3, start_round: int = 1) -> RunPlan:
    contract = breast_cancer_contract(rounds=rounds, encryption=False)
    return RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=10,
        sites=("hospital-a", "hospital-b", "hospital-c"),
        records_dir=records,
        start_round=start_round,
    )


def _write_round(plan: RunPlan, n: int) -> RoundRecord:
    assert plan.records_dir is not None
    record = round_record(plan, n, 0.5 * n)
    write_json(plan.records_dir / f"round-{n:04d}.json", record.as_record())
    write_checkpoint(plan.records_dir, _model(n))
    return record


def _finish(plan: RunPlan, rounds: list[RoundRecord]) -> None:
    assert plan.records_dir is not None
    write_json(
        plan.records_dir / "outcome.json",
        StudyOutcome(plan.study_id, plan.contract_hash, "completed", rounds).as_record(),
    )


def test_rounds_finished_while_nobody_followed_are_reported_then_the_run_goes_on(
    tmp_path: Path, link: SuperLinkHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server and SuperLink restarted: round 2 finished before the crash but was never
    recorded; the old run is gone (failed); a new run starts at round 3."""
    fake = FakeSuperLink(monkeypatch, status="finished:failed")
    plan = _plain_plan(tmp_path / "records", start_round=2)
    r1, r2 = _write_round(plan, 1), _write_round(plan, 2)
    write_json(tmp_path / "records" / RUN_FILE, {"run_id": 7, "start_round": 1})
    fake.on_start = lambda p: _finish(p, [r1, r2, _write_round(p, 3)])
    reported: list[int] = []

    runner = superlink_runner(link, app_dir=tmp_path, work_dir=tmp_path / "w", poll_s=0.01)
    outcome = runner(plan, lambda r: reported.append(r.round_number))

    assert outcome.status == "completed"
    assert reported == [2, 3]  # round 1 was on record already; nothing twice
    assert fake.started == [3]
    assert fake.stopped == [7]
    assert json.loads((tmp_path / "records" / RUN_FILE).read_text()) == {
        "run_id": 42,
        "start_round": 3,
    }


def test_a_run_still_alive_on_the_superlink_is_followed_not_restarted(
    tmp_path: Path, link: SuperLinkHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the consortium server restarted: the ServerApp kept going."""
    fake = FakeSuperLink(monkeypatch, status="running")
    plan = _plain_plan(tmp_path / "records", start_round=2)
    r1 = _write_round(plan, 1)
    write_json(tmp_path / "records" / RUN_FILE, {"run_id": 7, "start_round": 1})
    reported: list[int] = []

    def hook(record: RoundRecord) -> None:
        reported.append(record.round_number)
        if record.round_number == 2:  # the live run finishes while it is followed
            r3 = _write_round(plan, 3)
            _finish(plan, [r1, round_record(plan, 2, 1.0), r3])

    _write_round(plan, 2)
    runner = superlink_runner(
        link, app_dir=tmp_path, work_dir=tmp_path / "w", poll_s=0.01, liveness_s=1.0
    )
    with heartbeat(tmp_path / "records" / HEARTBEAT_FILE, interval_s=0.05):
        outcome = runner(plan, hook)

    assert outcome.status == "completed"
    assert reported == [2, 3]
    assert fake.started == []
    assert fake.stopped == []


def test_a_run_the_restarted_superlink_still_lists_but_nobody_serves_is_replaced(
    tmp_path: Path, link: SuperLinkHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SuperLink was restarted too: it lists the old run as running for a while, but
    its ServerApp died with it (the heartbeat file stands still)."""
    fake = FakeSuperLink(monkeypatch, status="running")
    plan = _plain_plan(tmp_path / "records", rounds=2, start_round=2)
    r1 = _write_round(plan, 1)
    write_json(tmp_path / "records" / RUN_FILE, {"run_id": 7, "start_round": 1})
    write_json(tmp_path / "records" / HEARTBEAT_FILE, {"beat": 9})
    fake.on_start = lambda p: _finish(p, [r1, _write_round(p, 2)])

    runner = superlink_runner(
        link, app_dir=tmp_path, work_dir=tmp_path / "w", poll_s=0.01, liveness_s=0.5
    )
    assert runner(plan, lambda r: None).status == "completed"
    assert fake.stopped == [7]
    assert fake.started == [2]


def test_all_rounds_done_but_no_outcome_ends_with_the_last_checkpoint(
    tmp_path: Path, link: SuperLinkHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSuperLink(monkeypatch, status=None)
    plan = _plain_plan(tmp_path / "records", rounds=2, start_round=2)
    _write_round(plan, 1), _write_round(plan, 2)
    reported: list[int] = []

    outcome = superlink_runner(link, app_dir=tmp_path, work_dir=tmp_path)(
        plan, lambda r: reported.append(r.round_number)
    )

    assert outcome.status == "completed"
    assert outcome.final_model == _model(2)
    assert [r.round_number for r in outcome.rounds] == [1, 2]
    assert reported == [2]
    assert fake.started == []


def test_a_missing_checkpoint_stops_the_resume_before_any_run_starts(
    tmp_path: Path, link: SuperLinkHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSuperLink(monkeypatch, status=None)
    plan = _plain_plan(tmp_path / "records", start_round=2)
    _write_round(plan, 1)
    for path in (tmp_path / "records").glob("model-*"):
        path.unlink()
    with pytest.raises(CheckpointError, match="round 1"):
        superlink_runner(link, app_dir=tmp_path, work_dir=tmp_path)(plan, lambda r: None)
    assert fake.started == []


# --- the consortium side: resume_run, record_round, RunManager.resume_interrupted ----------------


def _running_with_one_round(
    client: TestClient, consortium: People, app: FastAPI, records: Path
) -> tuple[dict[str, Any], bytes, RunPlan]:
    """A study whose run started and recorded round 1 of 3, then the server stopped."""
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    factory, log = app.state.sessionmaker, app.state.audit_log
    with session_scope(factory) as session:
        plan = begin_run(session, study["id"], log=log, actor=None, records_dir=records)
    with session_scope(factory) as session:
        record_round(session, round_record(plan, 1, 0.5), log=log)
    return study, secret, plan


def test_a_round_delivered_again_is_not_recorded_twice(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    study, _, plan = _running_with_one_round(client, consortium, app, tmp_path)
    with session_scope(app.state.sessionmaker) as session:
        record_round(session, round_record(plan, 1, 0.5), log=app.state.audit_log)
    assert audit_actions(app, study["id"]).count("round.completed") == 1


def test_resume_run_goes_on_after_the_last_recorded_round_and_is_audited(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    study, _, _ = _running_with_one_round(client, consortium, app, tmp_path)
    with session_scope(app.state.sessionmaker) as session:
        plan = resume_run(
            session,
            study["id"],
            log=app.state.audit_log,
            records_dir=tmp_path,
            policy=app.state.policy_context,
        )
    assert plan.start_round == 2
    actions = audit_actions(app, study["id"])
    assert actions[-2:] == ["study.run_resumed", "policy.decision"]


def test_only_running_studies_resume(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    from consortium_server.errors import ConflictError

    study = submit_and_approve(client, consortium)
    with (
        session_scope(app.state.sessionmaker) as session,
        pytest.raises(ConflictError, match="running"),
    ):
        resume_run(session, study["id"], log=app.state.audit_log, records_dir=tmp_path)


def test_the_run_manager_resumes_running_studies_at_start_up(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    study, secret, _ = _running_with_one_round(client, consortium, app, tmp_path)
    seen: list[int] = []
    manager = RunManager(
        app.state.sessionmaker,
        app.state.audit_log,
        resuming_runner(secret, seen),
        policy=app.state.policy_context,
    )
    assert manager.resume_interrupted(tmp_path) == [study["id"]]
    assert manager.wait(study["id"], timeout=60).status == "completed"
    assert seen == [2]
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "completed"
    assert final["current_round"] == 3
    actions = audit_actions(app, study["id"])
    assert actions.count("round.completed") == 3
    assert actions.count("study.run_resumed") == 1
    assert manager.resume_interrupted(tmp_path) == []  # nothing left running


def test_a_study_whose_next_round_the_policy_now_denies_is_failed_not_resumed(
    client: TestClient, consortium: People, app: FastAPI, tmp_path: Path
) -> None:
    study, _, _ = _running_with_one_round(client, consortium, app, tmp_path)
    files = dict(client.get("/api/v1/policy", headers=consortium.admin).json()["files"])
    files["freeze.cedar"] = (
        '@id("freeze.rounds")\n@reason("Training is paused for a security review.")\n'
        'forbid (principal, action == Concord::Action::"RunRound", resource);\n'
    )
    response = client.post("/api/v1/policy", json={"files": files}, headers=consortium.admin)
    assert response.status_code == 201

    def never(plan: RunPlan) -> Any:
        raise AssertionError("no run may start")

    manager = RunManager(
        app.state.sessionmaker, app.state.audit_log, never, policy=app.state.policy_context
    )
    assert manager.resume_interrupted(tmp_path) == []
    final = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert final["state"] == "failed"
    assert "paused for a security review" in final["state_reason"]
    actions = audit_actions(app, study["id"])
    assert actions[-4:-2] == ["study.run_resumed", "policy.decision"]
    assert actions[-2:] == ["study.failed", "budget.released"]
