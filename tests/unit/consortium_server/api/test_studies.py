"""Study lifecycle through the API: submit, approve per site, decline, abort, bad input."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.world import People, dataset_body, signed_approval, study_contract

DATASETS = ["bc-a", "bc-b", "bc-c"]


def submit(client: TestClient, people: People, **overrides: Any) -> dict[str, Any]:
    response = client.post(
        "/api/v1/studies", json=study_contract(DATASETS, **overrides), headers=people.researcher
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def decide(
    client: TestClient,
    people: People,
    study: dict[str, Any],
    site: str,
    decision: str = "approved",
    *,
    reason: str = "Reviewed by the data access committee.",
    contract_hash: str | None = None,
    **overrides: Any,
) -> Any:
    """Post the site's signed decision (``reason`` and ``contract_hash`` are signed;
    ``overrides`` replace fields after signing, as a tampering client would)."""
    body = {
        **signed_approval(
            client,
            people.steward(site),
            study,
            f"hospital-{site}",
            decision,
            reason,
            contract_hash=contract_hash,
        ),
        **overrides,
    }
    return client.post(
        f"/api/v1/studies/{study['id']}/approvals", json=body, headers=people.steward(site)
    )


def test_submit_then_every_site_approves(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    assert study["state"] == "awaiting_approvals"
    assert len(study["contract_hash"]) == 64
    assert [s["site_id"] for s in study["sites"]] == ["hospital-a", "hospital-b", "hospital-c"]

    for site in ("a", "b"):
        response = decide(client, consortium, study, site)
        assert response.status_code == 201, response.text
        assert response.json()["state"] == "awaiting_approvals"
    response = decide(client, consortium, study, "c")
    final = response.json()
    assert final["state"] == "approved"
    assert {s["decision"] for s in final["sites"]} == {"approved"}
    assert [e["to_state"] for e in final["events"]] == [
        "submitted",
        "awaiting_approvals",
        "approved",
    ]
    assert final["sites"][0]["decided_by"] == "steward-a"


def test_contract_hash_is_the_canonical_hash(client: TestClient, consortium: People) -> None:
    from concord_protocol.contract import StudyContract

    study = submit(client, consortium)
    assert StudyContract.model_validate(study["contract"]).contract_hash() == study["contract_hash"]


def test_one_decline_rejects_with_reason(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    response = decide(client, consortium, study, "b", "declined", reason="Cohort overlaps.")
    assert response.status_code == 201
    body = response.json()
    assert body["state"] == "rejected"
    assert "hospital-b" in body["state_reason"]
    assert "Cohort overlaps." in body["state_reason"]
    late = decide(client, consortium, study, "c")
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "study.invalid_transition"


def test_decline_needs_a_reason(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    response = decide(client, consortium, study, "a", "declined", reason="")
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "body.reason"


def test_a_second_different_decision_is_refused(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    assert decide(client, consortium, study, "a").status_code == 201
    again = decide(client, consortium, study, "a", "declined", reason="Changed our mind.")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "approval.duplicate"
    assert again.json()["error"]["request_id"]
    detail = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert detail["state"] == "awaiting_approvals"  # the decline was not taken


def test_the_same_signed_decision_posted_again_changes_nothing(
    client: TestClient, consortium: People
) -> None:
    """A retry (or the site agent re-posting what the CLI just posted) is not a conflict,
    and it is recorded once: one approval row, one audit entry."""
    study = submit(client, consortium)
    body = signed_approval(client, consortium.steward("a"), study, "hospital-a", "approved")
    url = f"/api/v1/studies/{study['id']}/approvals"
    first = client.post(url, json=body, headers=consortium.steward("a"))
    assert first.status_code == 201
    again = client.post(url, json=body, headers=consortium.steward("a"))
    assert again.status_code == 201
    assert again.json() == first.json()
    export = client.get("/api/v1/audit/export", headers=consortium.compliance).json()
    entries = [json.loads(base64.b64decode(e["entry_b64"])) for e in export["entries"]]
    approvals = [
        e for e in entries if e["action"] == "study.site_approved" and study["id"] in str(e)
    ]
    assert len(approvals) == 1


def test_approving_for_another_site_is_forbidden(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    response = client.post(
        f"/api/v1/studies/{study['id']}/approvals",
        json=signed_approval(client, consortium.steward("a"), study, "hospital-b", "approved"),
        headers=consortium.steward("a"),
    )
    assert response.status_code == 403
    assert "hospital-b" in response.json()["error"]["message"]
    current = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert all(s["decision"] is None for s in current["sites"])


def test_approval_of_a_different_hash_is_refused(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    response = decide(client, consortium, study, "a", contract_hash="0" * 64)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "approval.hash_mismatch"


def test_unknown_dataset_is_named(client: TestClient, consortium: People) -> None:
    response = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-nowhere"]),
        headers=consortium.researcher,
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "study.invalid"
    assert "bc-nowhere" in error["message"]
    listed = client.get("/api/v1/studies", headers=consortium.researcher).json()
    assert listed == []


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", str(2**60)])
def test_hyperparameters_the_hash_cannot_hold_are_a_422_not_a_500(
    client: TestClient, consortium: People, raw: str
) -> None:
    body = study_contract(["bc-a", "bc-b", "bc-c"])
    text = json.dumps(body).replace('"hidden": 16', f'"hidden": {raw}')
    assert raw in text
    response = client.post(
        "/api/v1/studies",
        content=text,
        headers={**consortium.researcher, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["request_id"]
    assert "RFC 8785" in json.dumps(error)
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []


@pytest.mark.parametrize(
    ("model", "field", "text"),
    [
        (
            {"name": "tabular-mlp", "version": "1", "hyperparameters": {"hidden": 10**6}},
            "model.hyperparameters.hidden",
            "hidden",
        ),
        (
            {"name": "tabular-mlp", "version": "1", "hyperparameters": {"colour": "blue"}},
            "model.hyperparameters.colour",
            "not accepted",
        ),
        ({"name": "gpt-9", "version": "1", "hyperparameters": {}}, "model", "no catalogue model"),
    ],
    ids=["out-of-range", "unknown-hyperparameter", "unknown-model"],
)
def test_the_server_checks_the_model_against_the_catalogue(
    client: TestClient, consortium: People, model: dict[str, object], field: str, text: str
) -> None:
    body = study_contract(["bc-a", "bc-b", "bc-c"], model=model)
    response = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "study.invalid"
    assert error["details"][0]["field"] == field
    assert text in error["message"]
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []


def test_a_lone_surrogate_in_a_contract_is_a_422(client: TestClient, consortium: People) -> None:
    """Text that is not valid Unicode has no UTF-8 form, so no hash: refused, not a 500."""
    text = json.dumps(study_contract(["bc-a", "bc-b", "bc-c"])).replace(
        '"Malignancy from FNA features"', '"Malignancy \\ud800 from FNA"'
    )
    assert "\\ud800" in text
    response = client.post(
        "/api/v1/studies",
        content=text,
        headers={**consortium.researcher, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["request_id"]


def test_evaluation_releases_that_alone_spend_the_budget_are_refused(
    client: TestClient, consortium: People
) -> None:
    """An explicit evaluation noise so small that the releases alone cost the whole epsilon:
    no site could train the study, so it is refused at submission, with nothing stored."""
    body = study_contract(
        ["bc-a", "bc-b", "bc-c"],
        privacy={"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0},
        evaluation={"noise_multiplier": 0.5},
    )
    response = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "study.invalid"
    assert error["request_id"]
    assert "evaluation releases alone would cost epsilon" in error["message"]
    assert error["details"][0]["field"] == "evaluation.noise_multiplier"
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []
    # The same study with the noise derived from a share of its epsilon is accepted.
    body["evaluation"] = {"epsilon_share": 0.3}
    accepted = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
    assert accepted.status_code == 201, accepted.text


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c.pop("title"), "body.title"),
        (lambda c: c.pop("purpose"), "body.purpose"),
        (lambda c: c.update(purpose="curiosity"), "body.purpose"),
        (lambda c: c.pop("ethics_reference"), "body.ethics_reference"),
        (lambda c: c.update(datasets=[]), "body.datasets"),
        (lambda c: c.update(datasets=["bc-a", "bc-a", "bc-b"]), "body.datasets"),
        (lambda c: c.update(datasets=["Not A Slug!"]), "body.datasets.0"),
        (lambda c: c["model"].pop("name"), "body.model.name"),
        (lambda c: c["model"].update(version="latest"), "body.model.version"),
        (lambda c: c["training"].update(rounds=0), "body.training.rounds"),
        (lambda c: c["privacy"].update(epsilon=-1), "body.privacy.epsilon"),
        (lambda c: c["privacy"].update(delta=0.5), "body.privacy.delta"),
        (lambda c: c.update(surprise=True), "body.surprise"),
        (lambda c: c["encryption"].update(scheme="bfv"), "body.encryption.scheme"),
    ],
)
def test_malformed_study_names_the_field(
    client: TestClient, consortium: People, mutate: Any, field: str
) -> None:
    contract = study_contract(DATASETS)
    mutate(contract)
    response = client.post("/api/v1/studies", json=contract, headers=consortium.researcher)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "request.invalid"
    assert field in [d["field"] for d in error["details"]]
    assert field in error["message"]


def test_too_few_sites_is_rejected_with_reason(client: TestClient, consortium: People) -> None:
    response = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b"]),
        headers=consortium.researcher,
    )
    assert response.status_code == 201
    body = response.json()
    assert body["state"] == "rejected"
    assert "needs 3 sites" in body["state_reason"]


def test_owner_can_abort_but_not_twice(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    url = f"/api/v1/studies/{study['id']}/abort"
    response = client.post(url, json={"reason": "Wrong cohort."}, headers=consortium.researcher)
    assert response.status_code == 200
    assert response.json()["state"] == "aborted"
    again = client.post(url, json={"reason": "Again."}, headers=consortium.researcher)
    assert again.status_code == 409


def test_expired_approval_window_rejects(client: TestClient, consortium: People, app: Any) -> None:
    from datetime import timedelta

    from consortium_server.db.base import utcnow
    from consortium_server.studies.models import Study

    study = submit(client, consortium)
    with app.state.sessionmaker() as session:
        row = session.get(Study, study["id"])
        row.approval_deadline = utcnow() - timedelta(minutes=1)
        session.commit()
    current = client.get(f"/api/v1/studies/{study['id']}", headers=consortium.researcher).json()
    assert current["state"] == "rejected"
    assert "approval window" in current["state_reason"]
    assert decide(client, consortium, study, "a").status_code == 409


def test_list_filters_by_state(client: TestClient, consortium: People) -> None:
    study = submit(client, consortium)
    client.post("/api/v1/studies", json=study_contract(["bc-a"]), headers=consortium.researcher)
    waiting = client.get(
        "/api/v1/studies", params={"state": "awaiting_approvals"}, headers=consortium.researcher
    ).json()
    assert [s["id"] for s in waiting] == [study["id"]]
    bad = client.get("/api/v1/studies", params={"state": "sleeping"}, headers=consortium.admin)
    assert bad.status_code == 422


def test_an_idempotency_key_makes_a_retried_submission_return_the_same_study(
    client: TestClient, consortium: People, app: FastAPI
) -> None:
    """A researcher whose answer was lost submits again with the same key: the same study
    comes back (200, marked replayed), no second study, no second audit trail; the key with
    another draft is a 409; another researcher's identical key is theirs alone."""
    body = study_contract(["bc-a", "bc-b", "bc-c"])
    key = {"Idempotency-Key": "3f2b7c1e-submission-0001"}
    first = client.post("/api/v1/studies", json=body, headers={**consortium.researcher, **key})
    assert first.status_code == 201, first.text
    entries = _audit_size(app)
    again = client.post("/api/v1/studies", json=body, headers={**consortium.researcher, **key})
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert _audit_size(app) == entries  # nothing happened the second time
    listed = client.get("/api/v1/studies", headers=consortium.researcher).json()
    assert [s["id"] for s in listed] == [first.json()["id"]]

    other = {**body, "title": "Another study altogether"}
    conflict = client.post("/api/v1/studies", json=other, headers={**consortium.researcher, **key})
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "study.idempotency_conflict"
    assert conflict.json()["error"]["request_id"]

    without = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
    assert without.status_code == 201  # no key: a new study, as before
    assert without.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("bad", ["short", "has spaces in it", "x" * 129])
def test_a_malformed_idempotency_key_is_a_422(
    client: TestClient, consortium: People, bad: str
) -> None:
    response = client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers={**consortium.researcher, "Idempotency-Key": bad},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "request.invalid"
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []


def _audit_size(app: FastAPI) -> int:
    with app.state.sessionmaker() as session:
        return int(app.state.audit_log.size(session=session))


UNET = {"name": "unet", "version": "1", "hyperparameters": {"levels": 3}}
SEGMENTATION = {"kind": "segmentation"}


def _publish_volumes(client: TestClient, people: People) -> list[str]:
    """Each site also publishes a segmentation dataset of MR volumes (mr-<x>)."""
    for site in "abc":
        body = dataset_body(
            f"mr-{site}",
            f"hospital-{site}",
            modality="image",
            task="segmentation",
            feature_summary={"input_shape": [1, 32, 32, 32], "num_classes": 2},
        )
        response = client.post("/api/v1/datasets", json=body, headers=people.steward(site))
        assert response.status_code == 201, response.text
    return ["mr-a", "mr-b", "mr-c"]


@pytest.mark.parametrize(
    ("overrides", "field", "text"),
    [
        ({"task": SEGMENTATION}, "model", "tabular-mlp v1 is a classification model"),
        ({"task": SEGMENTATION, "model": UNET}, "datasets", "not labelled for segmentation"),
        ({"model": UNET}, "model", "unet v1 is a segmentation model"),
    ],
    ids=["classifier-for-masks", "labels-for-a-segmentation-study", "unet-for-labels"],
)
def test_a_study_whose_model_or_data_is_not_of_its_task_is_refused(
    client: TestClient, consortium: People, overrides: dict[str, Any], field: str, text: str
) -> None:
    body = study_contract(DATASETS, **overrides)
    response = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["details"][0]["field"]) == ("study.invalid", field)
    assert text in error["message"]
    assert error["request_id"]
    assert client.get("/api/v1/studies", headers=consortium.researcher).json() == []


def test_a_segmentation_study_over_segmentation_data_is_accepted_with_its_task(
    client: TestClient, consortium: People
) -> None:
    volumes = _publish_volumes(client, consortium)
    mixed = study_contract(["bc-a", *volumes], task=SEGMENTATION, model=UNET)
    refused = client.post("/api/v1/studies", json=mixed, headers=consortium.researcher)
    assert refused.status_code == 422
    assert "bc-a" in refused.json()["error"]["message"]
    response = client.post(
        "/api/v1/studies",
        json=study_contract(volumes, task=SEGMENTATION, model=UNET),
        headers=consortium.researcher,
    )
    assert response.status_code == 201, response.text
    study = response.json()
    assert study["contract"]["task"] == {"kind": "segmentation", "loss": "dice"}
    # The contract's hash covers the task: a site recomputes the same one.
    from concord_protocol.contract import StudyContract

    assert StudyContract.model_validate(study["contract"]).contract_hash() == study["contract_hash"]
    classification = study_contract(volumes)  # a classifier over masks
    response = client.post("/api/v1/studies", json=classification, headers=consortium.researcher)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["details"][0]["field"] == "datasets"
    assert "not labelled for classification" in error["message"]


def test_declared_preprocessing_is_checked_against_the_datasets_it_would_run_on(
    client: TestClient, consortium: People
) -> None:
    volumes = _publish_volumes(client, consortium)
    steps = [
        {"op": "orientation", "axcodes": "RAS"},
        {"op": "scale_intensity_range", "a_min": -1000, "a_max": 400},
        {"op": "resize", "spatial_size": [16, 16, 16]},
    ]
    flat = [{"op": "resize", "spatial_size": [16, 16]}]
    for datasets, preprocessing, task, model, named in [
        (DATASETS, {"steps": steps[1:2]}, None, None, "bc-a"),  # tabular: nothing to apply
        (volumes, {"steps": flat}, SEGMENTATION, UNET, "mr-a"),  # 2D steps, 3D volumes
    ]:
        extra = {"task": task, "model": model} if task else {}
        body = study_contract(datasets, preprocessing=preprocessing, **extra)
        response = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (error["code"], error["details"][0]["field"]) == ("study.invalid", "preprocessing")
        assert named in error["message"]
    body = study_contract(volumes, task=SEGMENTATION, model=UNET, preprocessing={"steps": steps})
    response = client.post("/api/v1/studies", json=body, headers=consortium.researcher)
    assert response.status_code == 201, response.text
    contract = response.json()["contract"]
    assert [s["op"] for s in contract["preprocessing"]["steps"]] == [s["op"] for s in steps]
    from concord_protocol.contract import StudyContract

    parsed = StudyContract.model_validate(contract)
    assert parsed.contract_hash() == response.json()["contract_hash"]
    assert parsed.preprocessing.output_spatial_shape() == (16, 16, 16)
