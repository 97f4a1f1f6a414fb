"""Drill: one of four sites sends a corrupt ciphertext.

The consortium app (SQLite, in process) runs a two-round study through
:func:`run_with_lifecycle` on an in-process grid of four sites running the real site
ClientApp (guard, Opacus DP-SGD, CKKS). hospital-d's replies are corrupted after its
ClientApp built them (its first ciphertext chunk zeroed, header digests recomputed, so only
the CKKS decoding can tell). Every round aggregates the other three; the round record and
its ``round.completed`` audit entry list hospital-d as rejected with ``undecodable_chunk``;
the study completes and the audit log verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.app import Context, Message, RecordDict

from consortium_server.audit.verify import verify_live
from consortium_server.federation.coordinator import run_with_lifecycle
from consortium_server.federation.models import StudyKeyRelay
from consortium_server.federation.serverapp import run_study_rounds
from consortium_server.federation.strategy import (
    REC_UPDATE,
    RoundHook,
    RunPlan,
    StudyOutcome,
    arrays_to_blobs,
    blobs_to_arrays,
)
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from consortium_server.studies.contract import StudyContract
from site_node.crypto import (
    EncodedUpdate,
    generate_study_context,
    public_context,
    study_key_fingerprint,
)
from site_node.federation.approvals import ApprovalStore
from site_node.federation.clientapp import app as client_app
from tests.support.world import People, build_consortium, study_contract

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

LETTERS = ("a", "b", "c", "d")
SITES = [f"hospital-{x}" for x in LETTERS]


def corrupt_update(blobs: list[bytes]) -> list[bytes]:
    """Zero the first ciphertext chunk; the header's digests are recomputed (well-formed
    on the wire, undecodable as CKKS)."""
    update = EncodedUpdate.from_bytes_list(blobs)
    chunks = [b"\x00" * len(update.chunks[0]), *update.chunks[1:]]
    rebuilt = type(update).build(
        update.header.round_info(), chunk_size=update.header.chunk_size, chunks=chunks
    )
    return rebuilt.to_bytes_list()


class DrillGrid:
    """A Flower Grid stand-in: each node runs the real site ClientApp in this process;
    replies from ``corrupt`` nodes to ``train`` get their ciphertext corrupted."""

    def __init__(self, contexts: dict[int, Context], *, corrupt: set[int]) -> None:
        self.contexts = contexts
        self.corrupt = corrupt
        self.corrupted = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = client_app(msg, self.contexts[node])
            if (
                node in self.corrupt
                and msg.metadata.message_type == "train"
                and not reply.has_error()
            ):
                blobs = arrays_to_blobs(reply.content.array_records[REC_UPDATE])
                reply.content[REC_UPDATE] = blobs_to_arrays(corrupt_update(blobs))
                self.corrupted += 1
            replies.append(reply)
        return replies


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    settings = ServerSettings(
        data_dir=tmp_path / "server",
        database={"url": f"sqlite:///{tmp_path / 'concord.db'}", "auto_migrate": True},
        policy={"member_organisations": ["University of Leiden"]},
    )
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower stamps messages with the process's run id (set by its runtimes)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: TaskIdentity.__dict__.get(k) for k in ("_run_id", "_node_id", "_task_id")}
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield
    for key, value in saved.items():
        setattr(TaskIdentity, key, value)


def _approved_study(client: TestClient, people: People) -> dict[str, Any]:
    contract = study_contract(
        [f"bc-{x}" for x in LETTERS],
        purpose="method_development",
        training={"rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.1},
        privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
        model={"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
    )
    response = client.post("/api/v1/studies", json=contract, headers=people.researcher)
    assert response.status_code == 201, response.text
    study: dict[str, Any] = response.json()
    for x in LETTERS:
        body = {
            "site_id": f"hospital-{x}",
            "contract_hash": study["contract_hash"],
            "decision": "approved",
        }
        response = client.post(
            f"/api/v1/studies/{study['id']}/approvals", json=body, headers=people.steward(x)
        )
        assert response.status_code == 201, response.text
    return study


def _site_contexts(root: Path, study: dict[str, Any], secret: bytes) -> list[dict[str, str]]:
    contract = StudyContract.model_validate(study["contract"])
    configs = []
    for i, x in enumerate(LETTERS):
        state = root / f"hospital-{x}"
        state.mkdir(parents=True)
        datasets = state / "datasets.yaml"
        datasets.write_text(
            yaml.safe_dump(
                [{"id": f"bc-{x}", "kind": "demo_breast_cancer", "site_index": i, "n_sites": 4}]
            )
        )
        store = ApprovalStore(state)
        store.approve(study["id"], contract, study["contract_hash"])
        store.save_study_key(study["id"], secret, sender_id="hospital-a")
        configs.append(
            {"site-id": f"hospital-{x}", "state-dir": str(state), "datasets-file": str(datasets)}
        )
    return configs


def test_corrupt_ciphertext_is_rejected_logged_and_the_round_goes_on(
    app: FastAPI, client: TestClient, tmp_path: Path, task_identity: None
) -> None:
    people = People(
        mint=lambda **claims: str(app.state.local_issuer.mint(audience="concord-api", **claims))
    )
    build_consortium(client, people, sites=LETTERS)
    study = _approved_study(client, people)
    secret = generate_study_context()
    public = public_context(secret)
    with app.state.sessionmaker() as session:
        session.add(
            StudyKeyRelay(
                study_id=study["id"],
                sender_site_id="hospital-a",
                contract_hash=study["contract_hash"],
                public_context=public,
                public_context_sha256=hashlib.sha256(public).hexdigest(),
                key_fingerprint=study_key_fingerprint(secret),
                uploaded_by="service-account-a",
            )
        )
        session.commit()
    node_configs = _site_contexts(tmp_path / "sites", study, secret)
    grids: list[DrillGrid] = []

    def runner(plan: RunPlan, hook: RoundHook) -> StudyOutcome:
        contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config=dict(config),
                state=RecordDict(),
                run_config=plan.to_run_config(),
            )
            for i, config in enumerate(node_configs)
        }
        grids.append(DrillGrid(contexts, corrupt={103}))
        plan = RunPlan(**{**plan.__dict__, "node_wait_s": 0.0})
        return run_study_rounds(grids[0], plan, hook=hook)  # type: ignore[arg-type]

    outcome = run_with_lifecycle(app.state.sessionmaker, app.state.audit_log, study["id"], runner)

    assert outcome.status == "completed", outcome.failure
    assert grids[0].corrupted == 2
    for record in outcome.rounds:
        assert record.status == "aggregated"
        assert record.participants == SITES[:3]
        assert record.missing_sites == []
        assert [(r["site_id"], r["reason"]) for r in record.rejected] == [
            ("hospital-d", "undecodable_chunk")
        ]
        assert set(record.sample_counts) == set(SITES[:3])
    # The audit log holds each rejection (who and why), from record_round.
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
        report = verify_live(session, server_public_key=app.state.tree_head_signer.public_key_b64)
    rounds = [e for e in entries if e.object.id == study["id"] and e.action.startswith("round.")]
    assert [e.action for e in rounds] == ["round.completed", "round.completed"]
    for entry in rounds:
        details = entry.details
        assert details["participants"] == SITES[:3]
        assert [(r["site_id"], r["reason"]) for r in details["rejected"]] == [
            ("hospital-d", "undecodable_chunk")
        ]
        assert "hospital-d" not in details["charged_epsilon"]
    assert report.ok, report.summary()
    final = client.get(f"/api/v1/studies/{study['id']}", headers=people.researcher).json()
    assert final["state"] == "completed"
    # hospital-d's dataset was never charged: its whole reservation went back.
    budget = client.get("/api/v1/budgets/bc-d", headers=people.researcher).json()
    assert float(budget["epsilon_spent"]) == 0.0
    assert float(budget["epsilon_reserved"]) == 0.0
