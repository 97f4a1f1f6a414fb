"""Drill: one of four sites sends a corrupt ciphertext.

The consortium app (SQLite, in process) runs a two-round study, every round reported to its
internal API, on an in-process grid of four sites running the real site
ClientApp (guard, Opacus DP-SGD, CKKS). hospital-d's replies are corrupted as it sends them,
as a faulty site would (its first ciphertext chunk zeroed, header digests recomputed, its
contribution signed again with its key, so only the CKKS decoding can tell). Round 1
aggregates the other three; its record and ``round.completed`` audit entry list hospital-d
as rejected with ``undecodable_chunk``. In round 2 hospital-d refuses to train on round 1's
aggregate, which left out its timely contribution (it cannot tell a reply spoilt in
transit from one the server dropped), so round 2's record lists its refusal instead; the
study completes and the audit log verifies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.app import Context, Message, RecordDict

from concord_protocol.contract import StudyContract
from concord_protocol.contributions import SignedContribution, sign_contribution
from concord_protocol.rounds import RoundAuditDetails
from concord_protocol.wire.format import sha256_hex
from concord_protocol.wire.messages import REC_SITE, REC_UPDATE, arrays_to_blobs, blobs_to_arrays
from consortium_server.audit.verify import verify_live
from consortium_server.federation.serverapp import run_study_rounds
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from site_node.crypto import (
    EncodedUpdate,
)
from site_node.federation.approvals import ApprovalStore
from tests.support.inprocess_grid import InProcessGrid, flower_task_identity
from tests.support.roster import pin_all, site_keys, write_site_keys
from tests.support.runs import begin, federation_gate
from tests.support.studies import relay_study_key, submit_and_approve
from tests.support.world import People, build_consortium

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


class DrillGrid(InProcessGrid):
    """Replies from ``corrupt`` nodes to ``train`` get their ciphertext corrupted."""

    def __init__(self, contexts: dict[int, Context], *, corrupt: set[int]) -> None:
        super().__init__(contexts)
        self.corrupt = corrupt
        self.corrupted = 0

    def reply(self, node: int, msg: Message, reply: Message) -> Message:
        if node in self.corrupt and msg.metadata.message_type == "train" and not reply.has_error():
            blobs = corrupt_update(arrays_to_blobs(reply.content.array_records[REC_UPDATE]))
            reply.content[REC_UPDATE] = blobs_to_arrays(blobs)
            # The corruption happens at the site (a faulty ClientApp): it signs what it sends.
            site = reply.content.config_records[REC_SITE]
            signed = SignedContribution.from_json(str(site["contribution"]))
            contribution = signed.contribution.model_copy(
                update={"update_digest": sha256_hex(blobs[0])}
            )
            key = site_keys(signed.contribution.site_id).signing_key
            site["contribution"] = sign_contribution(contribution, key).to_json()
            self.corrupted += 1
        return reply


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
    with flower_task_identity():
        yield


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
        write_site_keys(state, f"hospital-{x}")
        pin_all(state, f"hospital-{x}", contract.site_ids)
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
    study = submit_and_approve(
        client,
        people,
        [f"bc-{x}" for x in LETTERS],
        letters=LETTERS,
        purpose="method_development",
        training={"rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.1},
        privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
        model={"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
    )
    secret = relay_study_key(app, study)
    node_configs = _site_contexts(tmp_path / "sites", study, secret)
    plan = replace(begin(app, study["id"], policy=app.state.policy_context), node_wait_s=0.0)
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
    grid = DrillGrid(contexts, corrupt={103})
    outcome = run_study_rounds(grid, plan, gate=federation_gate(app, client, plan))  # type: ignore[arg-type]

    assert outcome.status == "completed", outcome.failure
    assert grid.corrupted == 1  # round 2: hospital-d refused before it had anything to send
    expected = [("undecodable_chunk", "digest"), ("error_reply", "own_contribution_omitted")]
    for record, (reason, detail) in zip(outcome.rounds, expected, strict=True):
        assert record.status == "aggregated"
        assert record.participants == SITES[:3]
        assert record.missing_sites == []
        assert [(r.site_id, r.reason) for r in record.rejected] == [("hospital-d", reason)]
        assert detail in record.rejected[0].detail or reason == "undecodable_chunk"
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
    charged = []
    for entry, (reason, _) in zip(rounds, expected, strict=True):
        details = RoundAuditDetails.model_validate(entry.details)
        assert details.record.participants == SITES[:3]
        assert [(r.site_id, r.reason) for r in details.record.rejected] == [("hospital-d", reason)]
        charged.append(details.charged_epsilon)
    # Round 1: hospital-d trained (and spent) before its ciphertext was corrupted on the way:
    # its signed spend report is charged though its update was dropped. Round 2: it refused
    # before training, so it spent nothing more.
    assert float(charged[0]["bc-d"]) > 0
    assert "bc-d" not in charged[1]
    assert report.ok, report.summary()
    final = client.get(f"/api/v1/studies/{study['id']}", headers=people.researcher).json()
    assert final["state"] == "completed"
    budget = client.get("/api/v1/budgets/bc-d", headers=people.researcher).json()
    assert float(budget["epsilon_spent"]) == pytest.approx(float(charged[0]["bc-d"]), abs=1e-6)
    assert float(budget["epsilon_reserved"]) == 0.0  # the rest of its reservation went back
