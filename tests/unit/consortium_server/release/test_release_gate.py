"""The release gate end to end: a study run to `completed` with a real CKKS final aggregate,
three sites decrypting it and signing off, and the researcher downloading model and card."""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from torch import nn

from concord_protocol.audit.heads import SignedTreeHead, decode_public_key, verify_tree_head
from concord_protocol.client import ConsortiumClient
from concord_protocol.contract import StudyContract
from concord_protocol.release import model_sha256, signoff_message
from concord_protocol.rounds import RoundRecord
from consortium_server.audit.verify import verify_live
from consortium_server.cli.studies import _safe_name
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.release.models import FinalAggregate
from consortium_server.release.service import store_final_aggregate
from site_node.crypto import (
    SiteKeyPair,
)
from site_node.data.demo import breast_cancer_site
from site_node.federation.approvals import ApprovalStore
from site_node.release import (
    ReleaseError,
    check_on_record,
    decrypt_final_model,
    sign_off,
    upload_layout,
)
from site_node.training import build_model, flatten, train_round, unflatten_into
from site_node.training.released import build_layout, load_released_model
from tests.support.cli import run_cli
from tests.support.roster import pin_all, site_keys
from tests.support.runs import begin, federation_gate
from tests.support.studies import (
    relay_study_key,
    signed_aggregate,
    site_spend,
    submit_and_approve,
)
from tests.support.world import People, dataset_body, site_enrolment

SITES = ("a", "b", "c")
WEIGHTS = {"a": 90.0, "b": 120.0, "c": 150.0}
BASE = "/api/v1/studies/{}/release"


@dataclass
class World:
    """A consortium whose sites' private keys and study keys the test holds."""

    client: TestClient
    app: FastAPI
    people: People
    keys: dict[str, SiteKeyPair]
    stores: dict[str, ApprovalStore]
    study: dict[str, Any]
    secret: bytes
    expected: np.ndarray[Any, np.dtype[np.float64]] | None = None

    @property
    def base(self) -> str:
        return BASE.format(self.study["id"])

    def api(self, site: str) -> ConsortiumClient:
        token = self.people.node(site)["Authorization"].removeprefix("Bearer ")
        return ConsortiumClient("http://testserver", token, transport=self.client._transport)

    def witnessed(self, api: ConsortiumClient) -> SignedTreeHead:
        """The latest head, checked with the server's key as the site's witness does."""
        body = api.request("GET", "/api/v1/audit/heads/latest")
        head = SignedTreeHead.model_validate({k: body[k] for k in SignedTreeHead.model_fields})
        verify_tree_head(head, decode_public_key(self.app.state.tree_head_signer.public_key_b64))
        return head

    def sign_off(self, site: str, *, upload: bool = False) -> str:
        with self.api(site) as api:
            result = sign_off(
                api,
                self.study["id"],
                site_id=f"hospital-{site}",
                keys=self.keys[site],
                store=self.stores[site],
                upload=upload,
                witnessed=self.witnessed(api),
            )
        return result.model_sha256

    def signed(self, site: str, digest: str, *, key: SiteKeyPair | None = None) -> Any:
        message = signoff_message(
            study_id=self.study["id"],
            contract_hash=self.study["contract_hash"],
            model_sha256=digest,
            site_id=f"hospital-{site}",
        )
        signature = (key or self.keys[site]).signing_key.sign(message)
        return self.client.post(
            f"{self.base}/signoffs",
            json={
                "site_id": f"hospital-{site}",
                "model_sha256": digest,
                "signature": base64.b64encode(signature).decode(),
            },
            headers=self.people.node(site),
        )

    def release(self, headers: dict[str, str] | None = None) -> Any:
        return self.client.post(self.base, headers=headers or self.people.researcher)

    def entries(self) -> list[dict[str, Any]]:
        log = self.app.state.audit_log
        with self.app.state.sessionmaker() as session:
            stored = [log.get_entry(i, session=session) for i in range(log.size(session=session))]
        return [
            s.entry.model_dump(mode="json") for s in stored if s.entry.object.id == self.study["id"]
        ]

    def actions(self) -> list[str]:
        return [e["action"] for e in self.entries()]


def _enrol(client: TestClient, people: People, site: str, keys: SiteKeyPair) -> None:
    body = site_enrolment(f"hospital-{site}", f"Hospital {site}")
    assert body["signing_public_key"] == keys.signing_public_b64
    assert client.post("/api/v1/sites", json=body, headers=people.admin).status_code == 201
    dataset = dataset_body(f"bc-{site}", f"hospital-{site}")
    response = client.post("/api/v1/datasets", json=dataset, headers=people.steward(site))
    assert response.status_code == 201, response.text


@pytest.fixture
def world(client: TestClient, people: People, app: FastAPI, tmp_path: Path) -> World:
    """Three hospitals with known keys and an approved study whose key they all hold."""
    keys = {site: site_keys(f"hospital-{site}") for site in SITES}
    for site in SITES:
        _enrol(client, people, site, keys[site])
    study = submit_and_approve(
        client,
        people,
        [f"bc-{s}" for s in SITES],
        letters=SITES,
        training={"rounds": 2, "local_epochs": 1, "batch_size": 64, "learning_rate": 0.1},
    )
    secret = relay_study_key(app, study)
    contract = StudyContract.model_validate(study["contract"])
    stores = {}
    for site in SITES:
        pin_all(tmp_path / f"site-{site}", f"hospital-{site}", contract.site_ids)
        store = ApprovalStore(tmp_path / f"site-{site}")
        store.approve(study["id"], contract, study["contract_hash"])
        store.save_study_key(study["id"], secret, sender_id="hospital-a")
        stores[site] = store
    return World(client, app, people, keys, stores, study, secret)


def _run(world: World, final: np.ndarray[Any, np.dtype[np.float64]] | None = None) -> World:
    """Drive the study to ``completed`` through the internal API as its ServerApp would,
    every round with a real encrypted aggregate (the last one is what the release keeps);
    ``final``: every site's last-round parameters (so that the released model is that)."""
    rng = np.random.default_rng(7)
    plan = begin(world.app, world.study["id"])
    gate = federation_gate(world.app, world.client, plan)
    for n in range(1, plan.rounds + 1):
        vectors = {s: rng.normal(0, 0.1, plan.num_params) for s in SITES}
        if final is not None and n == plan.rounds:
            vectors = {s: final for s in SITES}
        model = signed_aggregate(
            plan,
            world.secret,
            n,
            {f"hospital-{s}": vectors[s] for s in SITES},
            {f"hospital-{s}": int(WEIGHTS[s]) for s in SITES},
        )
        total = sum(WEIGHTS.values())
        weighted = np.sum([WEIGHTS[s] * vectors[s] for s in SITES], axis=0)
        world.expected = np.asarray(weighted / total, dtype=np.float64)
        record = RoundRecord(
            study_id=plan.study_id,
            contract_hash=plan.contract_hash,
            round_number=n,
            status="aggregated",
            participants=[f"hospital-{s}" for s in SITES],
            sample_counts={f"hospital-{s}": int(WEIGHTS[s]) for s in SITES},
            epsilon={f"hospital-{s}": 0.75 * n for s in SITES},
            spend={f"hospital-{s}": site_spend(plan, n, 0.75 * n, int(WEIGHTS[s])) for s in SITES},
            aggregate_digest=model.digest,
            total_weight=total,
            evaluation={"accuracy": 0.8 + 0.05 * n, "auc": 0.85 + 0.02 * n},
        )
        gate.report(record, model)
    assert (
        world.client.get(
            f"/api/v1/studies/{world.study['id']}", headers=world.people.researcher
        ).json()["state"]
        == "completed"
    )
    return world


@pytest.fixture
def completed(world: World) -> World:
    return _run(world)


def test_three_sites_decrypt_sign_off_and_the_researcher_gets_model_and_card(
    completed: World,
) -> None:
    w = completed
    hashes = {site: w.sign_off(site, upload=site == "b") for site in SITES}
    assert len(set(hashes.values())) == 1  # decryption is deterministic across sites
    digest = hashes["a"]

    response = w.release()
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["contract_hash"] == w.study["contract_hash"]
    assert card["sites"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert card["rounds_completed"] == 2
    assert card["final_round"] == 2
    assert card["model"]["sha256"] == digest
    assert card["model"]["name"] == "tabular-mlp"
    assert card["model"]["hyperparameters"]
    assert {d["dataset_id"]: d["epsilon_charged"] for d in card["datasets"]} == {
        "bc-a": "1.5",
        "bc-b": "1.5",
        "bc-c": "1.5",
    }
    assert all(float(d["delta_charged"]) == pytest.approx(1e-5) for d in card["datasets"])
    assert card["privacy"]["epsilon_target"] == 3.0
    # The guarantee, stated precisely: unit, neighbouring relation, evaluation cost, public.
    privacy = card["privacy"]
    assert privacy["unit"] == "one patient record of one dataset"
    assert "add/remove one record" in privacy["neighbouring"]
    contract = StudyContract.model_validate(w.study["contract"])
    evaluation = privacy["evaluation"]
    assert evaluation["mode"] == "dp_histogram"
    assert evaluation["releases"] == contract.training.rounds
    assert evaluation["noise_multiplier"] == contract.evaluation_noise()
    assert 0 < evaluation["epsilon_releases_alone"] < privacy["epsilon_target"]
    assert evaluation["epsilon_releases_alone"] == pytest.approx(
        contract.evaluation.epsilon_share * privacy["epsilon_target"], abs=0.02
    )
    assert "record count" in privacy["public"]
    assert "label counts of the training split" in privacy["public"]
    assert {d["protection"] for d in privacy["disclosures"]} == {"dp", "public"}
    assert any("group level" in n for n in privacy["not_covered"])
    assert card["evaluation"] == {"accuracy": pytest.approx(0.9), "auc": pytest.approx(0.89)}
    assert [s["site_id"] for s in card["signoffs"]] == card["sites"]
    assert card["audit_head"]["witnessed"] is False
    assert card["audit_head"]["tree_size"] >= 1

    model = w.client.get(f"{w.base}/model", headers=w.people.researcher)
    assert model.status_code == 200
    assert model.headers["x-model-sha256"] == digest == hashlib.sha256(model.content).hexdigest()
    vector = np.frombuffer(model.content, dtype="<f8")
    assert w.expected is not None
    np.testing.assert_allclose(vector, w.expected, atol=1e-6)  # the real weighted average

    stored = w.client.get(f"{w.base}/card", headers=w.people.researcher).json()
    assert stored["model"]["sha256"] == digest
    markdown = w.client.get(f"{w.base}/card?format=markdown", headers=w.people.admin)
    assert markdown.status_code == 200
    assert digest in markdown.text
    assert "Unit of privacy: one patient record of one dataset" in markdown.text
    assert "noisy histogram release(s)" in markdown.text
    assert "Released without DP (declared public): record count" in markdown.text
    state = w.client.get(f"/api/v1/studies/{w.study['id']}", headers=w.people.researcher).json()
    assert state["state"] == "released"

    actions = w.actions()
    assert actions.count("release.aggregate_fetched") == 3
    assert actions.count("release.signed_off") == 3
    assert actions.count("release.model_uploaded") == 1
    assert actions[-3:] == ["policy.decision", "study.released", "release.model_downloaded"]
    with w.app.state.sessionmaker() as session:
        report = verify_live(session, server_public_key=w.app.state.tree_head_signer.public_key_b64)
    assert report.ok, report.summary()
    # Released is terminal: a second release is refused.
    assert w.release().json()["error"]["code"] == "release.not_completed"


def test_a_site_whose_hash_disagrees_blocks_the_release_and_is_recorded(completed: World) -> None:
    w = completed
    w.sign_off("a", upload=True)
    w.sign_off("b")
    other = model_sha256(b"a model hospital-c decrypted differently")
    assert w.signed("c", other).status_code == 201

    status = w.client.get(w.base, headers=w.people.researcher).json()
    assert status["hashes_agree"] is False
    assert status["pending_sites"] == []
    response = w.release()
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "release.hash_mismatch"
    assert "hospital-c" in error["message"]
    mismatch = next(d for d in error["details"] if d["code"] == "release.hash_mismatch")
    assert mismatch["sites"] == ["hospital-a", "hospital-b", "hospital-c"]
    refused = [e for e in w.entries() if e["action"] == "release.refused"]
    assert refused
    assert refused[-1]["outcome"] == "denied"
    assert refused[-1]["details"]["code"] == "release.hash_mismatch"
    # A site cannot change its mind afterwards, and nothing was released.
    assert w.signed("c", status["signoffs"][0]["model_sha256"]).status_code == 409
    assert w.client.get(f"{w.base}/model", headers=w.people.researcher).status_code == 409
    state = w.client.get(f"/api/v1/studies/{w.study['id']}", headers=w.people.researcher).json()
    assert state["state"] == "completed"


def test_a_site_releases_only_the_aggregate_on_record_in_the_log_it_witnessed(
    completed: World,
) -> None:
    """The server must point at the final round's ``round.completed`` entry, and the entry
    must sit in a head the site witnessed, naming this aggregate's digest."""
    w = completed
    with w.api("b") as api:
        aggregate = api.request("GET", f"{w.base}/aggregate")
        head = w.witnessed(api)
        check_on_record(api, w.study["id"], aggregate, witnessed=head)  # the honest case
        round_1 = next(
            i
            for i, e in enumerate(audit_log_entries(w))
            if e["action"] == "round.completed"
            and e["object"]["id"] == w.study["id"]
            and e["details"]["record"]["round_number"] == 1
        )
        cases = [
            ({**aggregate, "audit_index": None}, head, "release.not_on_record"),
            ({**aggregate, "audit_index": round_1}, head, "release.not_on_record"),
            ({**aggregate, "digest": "00" * 32}, head, "release.not_on_record"),
            (aggregate, None, "release.not_witnessed"),
            (aggregate, head.model_copy(update={"tree_size": 1}), "release.not_witnessed"),
            # A head whose root the entry's proof does not reach (a rewritten log).
            (aggregate, head.model_copy(update={"root_hash": "ab" * 32}), "release.not_on_record"),
        ]
        for offered, witnessed, code in cases:
            with pytest.raises(ReleaseError) as refused:
                check_on_record(api, w.study["id"], offered, witnessed=witnessed)
            assert refused.value.code == code, (offered.get("audit_index"), code)


def audit_log_entries(w: World) -> list[dict[str, Any]]:
    """Every audit entry, in log order (its index is its position)."""
    log = w.app.state.audit_log
    with w.app.state.sessionmaker() as session:
        return [
            log.get_entry(i, session=session).entry.model_dump(mode="json")
            for i in range(log.size(session=session))
        ]


def test_a_missing_sign_off_is_refused(completed: World) -> None:
    w = completed
    w.sign_off("a", upload=True)
    w.sign_off("b")
    response = w.release()
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "release.signoffs_missing"
    assert "hospital-c" in error["message"]
    assert "release.refused" in w.actions()


def test_a_forged_signature_is_refused_and_recorded(completed: World) -> None:
    w = completed
    digest = w.sign_off("a")
    response = w.signed("c", digest, key=SiteKeyPair.generate())
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "release.signature_invalid"
    status = w.client.get(w.base, headers=w.people.researcher).json()
    assert status["pending_sites"] == ["hospital-b", "hospital-c"]
    refused = [e for e in w.entries() if e["action"] == "release.refused"]
    assert refused[-1]["details"]["stage"] == "signoff"


def test_uploaded_bytes_must_match_the_sites_sign_off(completed: World) -> None:
    w = completed
    w.sign_off("a")
    wrong = np.zeros(8, dtype="<f8").tobytes()
    response = w.client.post(
        f"{w.base}/model",
        content=wrong,
        headers={**w.people.node("a"), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "release.model_invalid"
    # Site b has not signed off: it may not upload at all.
    response = w.client.post(
        f"{w.base}/model",
        json={"model_b64": base64.b64encode(wrong).decode()},
        headers=w.people.node("b"),
    )
    assert response.status_code == 409


def test_wrong_roles_and_other_sites_are_forbidden(completed: World) -> None:
    w = completed
    assert w.client.get(f"{w.base}/aggregate", headers=w.people.researcher).status_code == 403
    assert w.client.get(f"{w.base}/aggregate", headers=w.people.steward("a")).status_code == 403
    _enrol(w.client, w.people, "d", site_keys("hospital-d"))
    response = w.client.get(f"{w.base}/aggregate", headers=w.people.node("d"))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "release.not_study_site"
    digest = model_sha256(b"x")
    message = signoff_message(
        study_id=w.study["id"],
        contract_hash=w.study["contract_hash"],
        model_sha256=digest,
        site_id="hospital-b",
    )
    response = w.client.post(
        f"{w.base}/signoffs",
        json={
            "site_id": "hospital-b",
            "model_sha256": digest,
            "signature": base64.b64encode(w.keys["b"].signing_key.sign(message)).decode(),
        },
        headers=w.people.node("a"),  # hospital-a's identity speaking for hospital-b
    )
    assert response.status_code == 403
    assert w.release(w.people.steward("a")).status_code == 403
    assert w.release(w.people.node("a")).status_code == 403
    assert w.client.get(f"{w.base}/model", headers=w.people.compliance).status_code == 403


def test_release_before_completion_is_a_conflict(world: World) -> None:
    w = world  # approved, never run
    response = w.release()
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "release.not_completed"
    response = w.client.get(f"{w.base}/aggregate", headers=w.people.node("a"))
    assert response.status_code == 409
    refused = [e for e in w.entries() if e["action"] == "release.refused"]
    assert refused[-1]["details"]["code"] == "release.not_completed"


def test_a_policy_denial_refuses_the_release(completed: World) -> None:
    w = completed
    for site in SITES:
        w.sign_off(site, upload=site == "a")
    # The consortium admin's organisation is not a consortium member: ReleaseModel forbids.
    response = w.release(w.people.admin)
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "policy.denied"
    assert "consortium member" in error["message"]
    refused = [e for e in w.entries() if e["action"] == "release.refused"][-1]
    assert refused["policy"]["decision"] == "deny"
    assert w.release().status_code == 200  # the owner, a member, may


def test_model_and_card_are_not_available_before_release(completed: World) -> None:
    w = completed
    response = w.client.get(f"{w.base}/model", headers=w.people.researcher)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "release.not_released"
    assert w.client.get(f"{w.base}/card", headers=w.people.researcher).status_code == 409
    assert w.client.get(f"{w.base}/model", headers=w.people.other_researcher).status_code == 404


def test_the_final_aggregate_is_kept_once(completed: World) -> None:
    w = completed
    with w.app.state.sessionmaker() as session:
        stored = session.get(FinalAggregate, w.study["id"])
        assert stored is not None
        blobs = tuple(b.data for b in stored.blobs)
        same = GlobalModel(stored.round_number, blobs, stored.total_weight, stored.digest)
        assert store_final_aggregate(session, w.study["id"], same) is stored
        header = json.loads(blobs[0])
        assert header["study_id"] == w.study["id"]
        assert stored.num_params == header["num_params"]


# ------------------------------------------------------------------ the released model file


def _trained(world: World) -> nn.Module:
    """The study's network, trained (one epoch, no DP) on a demo site's data: what the
    federation would have released, as every site's final-round parameters."""
    contract = StudyContract.model_validate(world.study["contract"])
    model = build_model(contract.model, input_shape=(30,), num_classes=2)
    train_round(model, breast_cancer_site(0)[0], contract.training, dp=None, seed=0)
    _run(world, final=flatten(model))
    return model.eval()


def _layout(w: World) -> dict[str, Any]:
    contract = StudyContract.model_validate(w.study["contract"])
    with w.app.state.sessionmaker() as session:
        num_params = session.get(FinalAggregate, w.study["id"]).num_params
    layout = build_layout(contract.model, input_shape=(30,), num_classes=2, num_params=num_params)
    assert layout is not None
    return layout.model_dump(mode="json")


def _model_bytes(w: World) -> bytes:
    """The decrypted model as site a holds it (what it signed off)."""
    with w.api("a") as api:
        aggregate = api.request("GET", f"{w.base}/aggregate")
    _hash, data = decrypt_final_model(
        aggregate, w.study["id"], store=w.stores["a"], site_id="hospital-a", keys=w.keys["a"]
    )
    return data


def test_the_released_model_is_a_safetensors_file_that_loads_into_the_trained_network(
    world: World,
) -> None:
    """Train a catalogue network, release it through the server (real CKKS aggregate, three
    sites signing off, one uploading with the layout), download the safetensors file and
    load it with the researcher's loader, every check on: it answers as the trained model."""
    w = world
    trained = _trained(w)
    with w.api("a") as api:
        aggregate = api.request("GET", f"{w.base}/aggregate")
    assert (aggregate["input_shape"], aggregate["num_classes"]) == ([30], 2)
    for site in SITES:
        w.sign_off(site, upload=site == "a")
    status = w.client.get(w.base, headers=w.people.researcher).json()
    assert status["model_layout"] is True
    card = w.release().json()

    response = w.client.get(f"{w.base}/model.safetensors", headers=w.people.researcher)
    assert response.status_code == 200, response.text
    blob = response.content
    name = f"{w.study['id']}-tabular-mlp-v1.safetensors"
    assert response.headers["content-disposition"] == f'attachment; filename="{name}"'
    assert response.headers["x-model-sha256"] == card["model"]["sha256"]
    assert card["model"]["file_name"] == name
    assert card["model"]["file_sha256"] == hashlib.sha256(blob).hexdigest()
    assert (card["model"]["input_shape"], card["model"]["num_classes"]) == ([30], 2)
    raw = w.client.get(f"{w.base}/model", headers=w.people.researcher).content
    assert blob.endswith(raw)  # the data section is the signed bytes
    tensors = safetensors.numpy.load(blob)  # the standard reader
    assert set(tensors) == {n for n, _ in trained.named_parameters()}
    metadata = safe_open_metadata(blob)
    assert metadata["concord.contract_hash"] == w.study["contract_hash"]
    assert metadata["concord.model_sha256"] == card["model"]["sha256"]

    contract = StudyContract.model_validate(w.study["contract"])
    model = load_released_model(
        blob,
        card=card,
        contract=contract,
        signing_keys={f"hospital-{s}": w.keys[s].signing_public_b64 for s in SITES},
    )
    features = breast_cancer_site(1)[1].features
    with torch.no_grad():
        # CKKS decryption is exact to ~1e-9 on each weight: the same scores, not the same bits.
        torch.testing.assert_close(model(features), trained(features), rtol=0, atol=1e-5)
        assert (model(features).argmax(1) == trained(features).argmax(1)).all()
        exact = build_model(contract.model, input_shape=(30,), num_classes=2).eval()
        unflatten_into(exact, np.frombuffer(raw, dtype="<f8").copy())
        torch.testing.assert_close(model(features), exact(features), rtol=0, atol=0)
    downloads = [e for e in w.entries() if e["action"] == "release.model_downloaded"]
    assert downloads[0]["details"]["format"] == "safetensors"


def safe_open_metadata(blob: bytes) -> dict[str, str]:
    """The file's ``__metadata__`` as the safetensors library reads it."""
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(blob)
        handle.flush()
        with safetensors.safe_open(handle.name, "np") as opened:
            return dict(opened.metadata())


def test_a_layout_that_does_not_fit_the_model_is_refused_with_a_code(completed: World) -> None:
    w = completed
    w.sign_off("a")
    data, layout = _model_bytes(w), _layout(w)
    model_b64 = base64.b64encode(data).decode()
    first = layout["parameters"][0]
    renamed = [{**first, "name": "renamed.weight"}, *layout["parameters"][1:]]
    cases: list[tuple[Any, str]] = [
        ({"input_shape": [30]}, "release.layout_invalid"),
        ({**layout, "parameters": layout["parameters"][:-1]}, "release.layout_invalid"),
        ({**layout, "input_shape": [31]}, "release.layout_invalid"),  # the sum still fits
        ({**layout, "num_classes": 3}, "release.layout_invalid"),
        (
            {**layout, "parameters": [first, first, *layout["parameters"][1:]]},
            "release.layout_invalid",
        ),
        ({**layout, "parameters": [{**first, "name": "__metadata__"}]}, "release.layout_invalid"),
        ({**layout, "parameters": [{**first, "shape": [-1]}]}, "release.layout_invalid"),
        ([1, 2], "request.invalid"),
    ]
    for bad, code in cases:
        response = w.client.post(
            f"{w.base}/model",
            json={"model_b64": model_b64, "layout": bad},
            headers=w.people.node("a"),
        )
        assert response.status_code == 422, (bad, response.text)
        error = response.json()["error"]
        assert (error["code"], bool(error["request_id"])) == (code, True), bad
    status = w.client.get(w.base, headers=w.people.researcher).json()
    assert status["model_sha256"] is None  # nothing was stored

    # The bytes alone first (octet-stream carries no layout), then the layout with them.
    raw = w.client.post(
        f"{w.base}/model",
        content=data,
        headers={**w.people.node("a"), "content-type": "application/octet-stream"},
    )
    assert (raw.status_code, raw.json()["layout"]) == (201, False)
    assert w.client.get(w.base, headers=w.people.researcher).json()["model_layout"] is False
    added = w.client.post(
        f"{w.base}/model",
        json={"model_b64": model_b64, "layout": layout},
        headers=w.people.node("a"),
    )
    assert (added.status_code, added.json()["layout"]) == (201, True)
    assert w.actions().count("release.layout_uploaded") == 1
    again = w.client.post(
        f"{w.base}/model",
        json={"model_b64": model_b64, "layout": layout},
        headers=w.people.node("a"),
    )
    assert again.status_code == 201
    other = w.client.post(
        f"{w.base}/model",
        json={"model_b64": model_b64, "layout": {**layout, "parameters": renamed}},
        headers=w.people.node("a"),
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "release.layout_exists"
    assert w.actions().count("release.layout_uploaded") == 1


def test_a_model_uploaded_without_its_layout_is_released_without_a_file(
    completed: World,
) -> None:
    w = completed
    for site in SITES:
        w.sign_off(site)
    response = w.client.post(
        f"{w.base}/model",
        content=_model_bytes(w),
        headers={**w.people.node("a"), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 201
    assert (
        w.client.get(f"{w.base}/model.safetensors", headers=w.people.researcher).status_code == 409
    )
    card = w.release().json()
    assert card["model"]["file_name"] is None
    response = w.client.get(f"{w.base}/model.safetensors", headers=w.people.researcher)
    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["code"], bool(error["request_id"])) == ("release.layout_missing", True)
    assert w.client.get(f"{w.base}/model", headers=w.people.researcher).status_code == 200
    assert (
        w.client.get(f"{w.base}/model.safetensors", headers=w.people.compliance).status_code == 403
    )


def test_a_site_does_not_upload_a_layout_for_an_input_the_model_was_not_sized_for(
    completed: World,
) -> None:
    """The server names the input shape; the uploading site sizes the network for it before
    building it, and refuses a shape that does not give the decrypted model's size."""
    w = completed
    contract = StudyContract.model_validate(w.study["contract"])
    with w.api("a") as api:
        aggregate = api.request("GET", f"{w.base}/aggregate")
    n = aggregate["num_params"]
    assert upload_layout(aggregate, contract.model, num_params=n) == _layout(w)
    assert upload_layout({**aggregate, "input_shape": None}, contract.model, num_params=n) is None
    for shape in ([31], [10**9], ["x"], [1, 64, 64]):
        with pytest.raises(ReleaseError) as refused:
            upload_layout({**aggregate, "input_shape": shape}, contract.model, num_params=n)
        assert refused.value.code == "release.layout_mismatch"


def test_the_cli_downloads_the_checked_file_with_its_card_beside_it(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    w = world
    trained = _trained(w)
    for site in SITES:
        w.sign_off(site, upload=site == "b")
    assert w.release().status_code == 200
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({f"hospital-{s}": w.keys[s].signing_public_b64 for s in SITES}))
    contract = tmp_path / "contract.json"
    contract.write_text(json.dumps(w.study["contract"]))
    out = tmp_path / "model.safetensors"
    code, output = run_cli(
        w.client,
        monkeypatch,
        w.people.researcher,
        "study",
        "download",
        w.study["id"],
        "--out",
        str(out),
        "--contract",
        str(contract),
        "--site-keys",
        str(keys),
    )
    assert code == 0, output
    assert "every site signed it" in output
    card = tmp_path / "model.card.json"
    model = load_released_model(out, card=card)
    features = breast_cancer_site(2)[1].features
    with torch.no_grad():
        torch.testing.assert_close(model(features), trained(features), rtol=0, atol=1e-5)

    # Another contract (or a site's key that did not sign) refuses the file: nothing written.
    other = {**w.study["contract"], "model": {**w.study["contract"]["model"], "version": "1.0"}}
    contract.write_text(json.dumps(other))
    elsewhere = tmp_path / "other.safetensors"
    args = ("study", "download", w.study["id"], "--out", str(elsewhere))
    code, output = run_cli(
        w.client, monkeypatch, w.people.researcher, *args, "--contract", str(contract)
    )
    assert code == 1
    assert "released_model.contract_mismatch" in output
    keys.write_text(json.dumps({"hospital-a": SiteKeyPair.generate().signing_public_b64}))
    code, output = run_cli(
        w.client, monkeypatch, w.people.researcher, *args, "--site-keys", str(keys)
    )
    assert code == 1
    assert "released_model.signoff_invalid" in output
    assert not elsewhere.exists()
    assert _safe_name("../../etc/passwd", "s-1") == "s-1.safetensors"
    assert _safe_name("s-1-tabular-mlp-v1.safetensors", "s-1") == "s-1-tabular-mlp-v1.safetensors"
