"""The internal API the ServerApp reports rounds to: who may call it, and every bad report
answered with a clear 4xx (stable code, request id) that records nothing."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.federation.checkpoints import pack_blobs, pack_checkpoint
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.run_messages import CHECKPOINT_MEDIA_TYPE, RoundReport
from tests.support.runs import begin, federation_gate, federation_token, synthetic_run
from tests.support.studies import (
    audit_actions,
    final_aggregate,
    relay_study_key,
    round_record,
    submit_and_approve,
)
from tests.support.world import People


@pytest.fixture
def running(client: TestClient, consortium: People, app: FastAPI) -> tuple[RunPlan, bytes]:
    study = submit_and_approve(client, consortium)
    secret = relay_study_key(app, study)
    federation_token(app)  # as a server configured with a SuperLink has one
    return begin(app, study["id"], policy=app.state.policy_context), secret


def _base(plan: RunPlan, attempt: str | None = None) -> str:
    return f"/internal/v1/federation/studies/{plan.study_id}/runs/{attempt or plan.attempt}"


def _auth(app: FastAPI) -> dict[str, str]:
    return {"Authorization": f"Bearer {federation_token(app)}"}


def _error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"]


def test_only_the_federation_token_is_admitted(
    client: TestClient, app: FastAPI, consortium: People, running: tuple[RunPlan, bytes]
) -> None:
    plan, _ = running
    url = f"{_base(plan)}/heartbeat"
    _error(client.post(url), 401, "auth.missing_token")
    _error(client.post(url, headers={"Authorization": "Bearer nope"}), 401, "auth.invalid_token")
    # A consortium user's token is no federation token, whatever its roles.
    _error(client.post(url, headers=consortium.admin), 401, "auth.invalid_token")
    assert client.post(url, headers=_auth(app)).json()["action"] == "continue"


def test_without_a_federation_token_the_api_is_closed(
    client: TestClient, app: FastAPI, running: tuple[RunPlan, bytes]
) -> None:
    plan, _ = running
    app.state.serverapp_token = None
    _error(client.post(f"{_base(plan)}/heartbeat"), 404, "federation.disabled")


def test_a_replaced_attempt_and_an_aborted_study_are_told_to_stop(
    client: TestClient, app: FastAPI, consortium: People, running: tuple[RunPlan, bytes]
) -> None:
    plan, _ = running
    other = "ab" * 16
    stale = client.post(f"{_base(plan, other)}/heartbeat", headers=_auth(app)).json()
    assert stale["action"] == "stop"
    assert "replaced" in stale["reason"]
    aborted = client.post(
        f"/api/v1/studies/{plan.study_id}/abort",
        json={"reason": "The ethics approval was withdrawn."},
        headers=consortium.researcher,
    )
    assert aborted.status_code == 200, aborted.text
    verdict = client.post(f"{_base(plan)}/heartbeat", headers=_auth(app)).json()
    assert verdict == {"action": "stop", "reason": "The study is aborted.", "next_round": None}


def test_bad_reports_are_refused_and_record_nothing(
    client: TestClient, app: FastAPI, running: tuple[RunPlan, bytes]
) -> None:
    plan, _ = running
    url = f"{_base(plan)}/rounds"

    def post(record: Any) -> Any:
        body = RoundReport(record=record).model_dump(mode="json")
        return client.post(url, json=body, headers=_auth(app))

    _error(post(round_record(plan, 2, 0.5)), 409, "federation.round_out_of_order")
    _error(post(round_record(plan, 1, 0.5)), 409, "federation.checkpoint_missing")
    wrong = round_record(plan, 1, 0.5).model_copy(update={"contract_hash": "00" * 32})
    _error(post(wrong), 422, "federation.report_invalid")
    _error(
        client.post(url, json={"record": {"round_number": 1}}, headers=_auth(app)),
        422,
        "request.invalid",
    )
    _error(
        client.post(f"{_base(plan, 'not-hex')}/rounds", json={}, headers=_auth(app)),
        422,
        "request.invalid",
    )
    assert "round.completed" not in audit_actions(app, plan.study_id)


def test_bad_checkpoints_are_refused(
    client: TestClient, app: FastAPI, running: tuple[RunPlan, bytes]
) -> None:
    plan, secret = running
    model = final_aggregate(plan, secret, 1)
    url = f"{_base(plan)}/rounds/1/checkpoint"
    headers = {**_auth(app), "Content-Type": CHECKPOINT_MEDIA_TYPE}

    def put(body: bytes, weight: float = 300.0, where: str = url) -> Any:
        return client.put(where, params={"total_weight": weight}, content=body, headers=headers)

    _error(put(b"\x00\x00\x00"), 422, "update.malformed")
    _error(put(pack_blobs([b"", b"{not a header}"])), 422, "update.malformed_header")
    _error(put(pack_blobs([b"", *model.blobs[:-1]])), 422, "update.wrong_chunk_count")
    _error(put(pack_checkpoint(model), weight=0), 422, "request.invalid")
    _error(
        put(pack_checkpoint(model), where=f"{_base(plan)}/rounds/2/checkpoint"),
        422,
        "update.header_mismatch",
    )
    assert put(pack_checkpoint(model)).json()["action"] == "continue"
    fetched = client.get(f"{_base(plan)}/checkpoints/1", headers=_auth(app))
    _error(fetched, 409, "federation.checkpoint_missing")  # not yet a recorded round


def test_a_report_posted_again_is_recorded_once_with_the_same_verdict(
    client: TestClient, app: FastAPI, running: tuple[RunPlan, bytes]
) -> None:
    plan, secret = running
    gate = federation_gate(app, client, plan)
    recorded, (first,) = synthetic_run(gate, [0.5], secret=secret)
    _, (again,) = synthetic_run(gate, [0.5], secret=secret)  # another aggregate, same round
    assert first == again
    assert first.next_round == 2
    assert audit_actions(app, plan.study_id).count("round.completed") == 1
    # The aggregate the round was recorded with is kept, and a restarted run fetches it.
    kept = gate.checkpoint(1)
    assert recorded.final_model is not None
    assert kept.blobs == recorded.final_model.blobs
    assert kept.total_weight == recorded.final_model.total_weight
