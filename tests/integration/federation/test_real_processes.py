"""Real processes on loopback: the consortium server, a SuperLink with TLS and SuperNode
authentication, and three hospitals (SuperNode with the guarded ClientApp runner, site
agent), as ``consortium demo`` runs them.

The ServerApp reports every round to the server's internal API and waits for the verdict,
so the server decides before each round whether the next one may start: a policy published
while round 1 trains stops the study before any site receives a round-2 message or spends
privacy budget on it.
"""

from __future__ import annotations

import base64
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from concord_protocol.contract import StudyContract
from concord_protocol.rounds import RoundAuditDetails
from consortium_server.federation.processes import run_status, start_run
from site_node.crypto import (
    generate_study_context,
    public_context,
    seal_study_key,
    study_key_fingerprint,
)
from site_node.data import breast_cancer_holdout, breast_cancer_site
from site_node.federation.approvals import ApprovalStore
from site_node.federation.processes import SuperNodeSpec, start_supernode
from site_node.training import centralised_baseline, evaluate, flatten
from site_node.training.released import load_released_model
from tests.support.drills import DrillStack, kill_process_group, wait_for
from tests.support.flower import free_port, make_site, make_supernode_key
from tests.support.flower_surface import write_bundle_pyproject

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrillStack]:
    with DrillStack.started(tmp_path_factory.mktemp("consortium"), n_sites=3) as stack:
        yield stack


def _rounds(stack: DrillStack, study_id: str) -> list[RoundAuditDetails]:
    return [RoundAuditDetails.model_validate(e["details"]) for e in stack.round_entries(study_id)]


def _dp_rounds(stack: DrillStack, study: dict[str, Any]) -> list[int]:
    counts = []
    for hospital in stack.hospitals:
        path = ApprovalStore(hospital.state_dir).dp_state_path(study["id"], study["contract_hash"])
        counts.append(int(json.loads(path.read_text())["rounds_completed"]))
    return counts


def test_dp_he_study_on_real_processes_beats_chance(consortium: DrillStack) -> None:
    # The seeded format (7.6 B/param) end to end; the drills run the TenSEAL-vector format.
    stack = consortium
    study = stack.submit_and_start(
        stack.contract(rounds=3, round_timeout_s=120, scheme="ckks_seeded")
    )
    final = stack.wait_for_end(study["id"], timeout=600)
    assert final["state"] == "completed", (final.get("state_reason"), stack.logs())
    rounds = _rounds(stack, study["id"])
    assert [r.record.round_number for r in rounds] == [1, 2, 3]
    sizes = {h.site_id: len(breast_cancer_site(h.index)[0]) for h in stack.hospitals}
    for details in rounds:
        record = details.record
        assert record.status == "aggregated"
        assert record.participants == sorted(sizes)
        assert record.sample_counts == sizes
        assert record.total_weight == sum(sizes.values())
        assert all(e is not None and 0 < e <= 6.0 + 1e-6 for e in record.epsilon.values())
        assert set(record.site_digests) == set(sizes)
        assert record.rejected == []
        assert record.evaluation["sites"] == 3.0
    eps = [r.record.epsilon["hospital-a"] for r in rounds]
    assert eps == sorted(eps)  # the accountant persists across rounds (and processes)
    assert _dp_rounds(stack, study) == [3, 3, 3]

    # The server holds only ciphertexts; the sites decrypt and sign off the final model.
    url = f"/api/v1/studies/{study['id']}/release"

    def signed_and_uploaded() -> bool:
        # The uploading site signs off before it uploads (the server checks the bytes
        # against its sign-off), so "no site pending" comes a moment before the model.
        status = stack.researcher.request("GET", url)
        return not status["pending_sites"] and status["model_sha256"] is not None

    wait_for("every site to sign off and one to upload", signed_and_uploaded, timeout=120)
    card = stack.researcher.request("POST", url)
    # The researcher's path: the safetensors file, checked against the card, the contract
    # and the sites' signatures (their keys as enrolled), loaded into the catalogue network.
    contract = StudyContract.model_validate(study["contract"])
    keys = {s["id"]: s["signing_public_key"] for s in stack.researcher.list_sites()}
    model = load_released_model(
        stack.researcher.download(f"{url}/model.safetensors"),
        card=card,
        contract=contract,
        signing_keys={site: keys[site] for site in card["sites"]},
    )
    vector = np.frombuffer(stack.researcher.download(f"{url}/model"), dtype="<f8").copy()
    np.testing.assert_array_equal(flatten(model), vector.astype(np.float32))
    holdout = breast_cancer_holdout()
    result = evaluate(model, holdout)
    baseline = centralised_baseline(
        [breast_cancer_site(i)[0] for i in range(3)], holdout, contract.model, contract.training
    )
    print(
        f"\nfederated DP+HE: accuracy {result.accuracy:.3f} AUC {result.auc:.3f}; "
        f"centralised non-private: accuracy {baseline.metrics.accuracy:.3f} "
        f"AUC {baseline.metrics.auc:.3f}"
    )
    majority = max(np.bincount(holdout.labels.numpy())) / len(holdout)
    assert result.accuracy > majority + 0.15
    assert result.auc > 0.9


def test_a_policy_published_while_round_1_trains_stops_the_study_before_round_2(
    consortium: DrillStack,
) -> None:
    stack = consortium
    active = stack.admin.request("GET", "/api/v1/policy")
    study = stack.submit_and_start(stack.contract(rounds=2, round_timeout_s=120))
    files = dict(active["files"])
    files["freeze.cedar"] = textwrap.dedent(
        """\
        @id("freeze.after-round-1")
        @reason("Round {context.round} is paused for a security review.")
        forbid (principal, action == Concord::Action::"RunRound", resource)
        when { context.round >= 2 };
        """
    )
    try:
        published = stack.admin.request("POST", "/api/v1/policy", json={"files": files})
        final = stack.wait_for_end(study["id"], timeout=600)
    finally:
        stack.admin.request("POST", f"/api/v1/policy/versions/{active['version']}/activate")
    # The denial was published before round 1 was on record: it was in force at the gate.
    stack.new_entries()
    entries = list(enumerate(stack.entries))
    publish_at = next(
        i
        for i, e in entries
        if e["action"] == "policy.published"
        and e["object"]["id"] == str(published["version"]["version"])
    )
    round_at = next(
        i
        for i, e in entries
        if e["action"] == "round.completed" and e["object"]["id"] == study["id"]
    )
    assert publish_at < round_at, "the policy was published too late to test the gate"
    assert final["state"] == "failed"
    assert "paused for a security review" in final["state_reason"]
    assert [r.record.round_number for r in _rounds(stack, study["id"])] == [1]
    decisions = [
        (e["details"]["round"], e["policy"]["decision"])
        for e in stack.entries
        if e["action"] == "policy.decision"
        and e["object"]["id"] == study["id"]
        and e["details"].get("action") == "RunRound"
    ]
    assert decisions == [(1, "allow"), (2, "deny")]
    # No site received a round-2 message, and no accountant was charged for round 2.
    for hospital in stack.hospitals:
        assert hospital.supernode is not None
        log = hospital.supernode.log_tail(5_000_000)
        assert f"ROUND {study['id']}/1]" in log
        assert f"ROUND {study['id']}/2]" not in log
    assert _dp_rounds(stack, study) == [1, 1, 1]


def _relay_key_without_the_agents(stack: DrillStack, study: dict[str, Any]) -> None:
    """hospital-a relays a study key as its agent would, with the keys the test holds."""
    sender, *others = stack.hospitals
    assert sender.keys is not None
    secret = generate_study_context()
    sealed = []
    for hospital in others:
        assert hospital.keys is not None
        sealed.append(
            seal_study_key(
                secret,
                sender_id=sender.site_id,
                sender_signing_key=sender.keys.signing_key,
                recipient_id=hospital.site_id,
                recipient_exchange_public=hospital.keys.exchange_public,
                study_id=study["id"],
                contract_hash=study["contract_hash"],
            ).model_dump(mode="json")
        )
    body = {
        "public_context": base64.b64encode(public_context(secret)).decode(),
        "key_fingerprint": study_key_fingerprint(secret),
        "sealed_keys": sealed,
    }
    stack.stack.client(sender.tokens["node"]).request(
        "POST", f"/api/v1/studies/{study['id']}/keys", json=body
    )


def test_run_of_a_contract_no_site_approved_locally_is_refused_by_every_site(
    consortium: DrillStack,
) -> None:
    """The server holds every site's signed approval; the sites' own stores no longer do
    (each steward withdrew it locally after posting, with the agents stopped so nothing
    was synchronised): a server claim is not enough, every site refuses round 1."""
    stack = consortium
    for hospital in stack.hospitals:
        if hospital.agent is not None:
            kill_process_group(hospital.agent.proc.pid)
            hospital.agent.stop()
            hospital.agent = None
    contract = stack.contract(rounds=1, round_timeout_s=60)
    contract["title"] = "Never approved at the sites"
    study = stack.researcher.submit_study(contract)
    assert study["state"] == "awaiting_approvals", study.get("state_reason")
    for hospital in stack.hospitals:
        stack.stack.approve(hospital, study, reason="Approved at the server only.")
    _relay_key_without_the_agents(stack, study)
    for hospital in stack.hospitals:
        ApprovalStore(hospital.state_dir).revoke(study["contract_hash"])
    stack.researcher.request("POST", f"/api/v1/studies/{study['id']}/run")
    final = stack.wait_for_end(study["id"], timeout=300)
    assert final["state"] == "failed"
    (details,) = _rounds(stack, study["id"])
    record = details.record
    assert record.participants == []
    assert [r.reason for r in record.rejected] == ["error_reply"] * 3
    assert all("contract.not_approved" in r.detail for r in record.rejected)
    for hospital in stack.hospitals:
        assert ApprovalStore(hospital.state_dir).get(study["contract_hash"]) is None


def test_unregistered_supernode_is_refused(consortium: DrillStack, tmp_path: Path) -> None:
    link = consortium.stack.link
    assert link is not None
    site = make_site(tmp_path / "intruder", 0)
    private, _ = make_supernode_key(site.state_dir / "keys")
    spec = SuperNodeSpec(
        site_id="intruder",
        state_dir=site.state_dir,
        datasets_file=site.datasets_file,
        superlink_address=link.address,
        root_certificates=consortium.stack.tls.ca_cert,
        auth_private_key=private,
        runtime_port=free_port(),
        max_wait_time=20.0,
    )
    node = start_supernode(spec, wait=False)
    try:
        code = node.proc.wait(timeout=90)
    finally:
        node.stop()
    assert code != 0
    assert "Failed to activate SuperNode" in node.log_tail(20000) or code == 305


FOREIGN_SERVERAPP = """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [
        grid.create_message(
            RecordDict({"config": ConfigRecord({"round": 1})}), "train", node, "attack", 60.0
        )
        for node in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=60))
    result = [
        {"error": r.has_error(), "reason": r.error.reason if r.has_error() else ""}
        for r in replies
    ]
    Path(str(context.run_config["out"])).write_text(json.dumps(result))
"""

FOREIGN_CLIENTAPP = """
from pathlib import Path

from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    Path({marker!r}).write_text("ran")
    raise RuntimeError("foreign code ran at the hospital")
"""


def test_a_foreign_app_bundle_runs_no_code_at_any_site(
    consortium: DrillStack, tmp_path: Path
) -> None:
    """Someone who can start runs ships a bundle with their own ServerApp and ClientApp: the
    SuperLink runs no ServerApp for it (only Concord's bundle), so no code runs anywhere.
    That a *hostile* SuperLink running such a bundle still runs no code at the sites is
    tests/integration/attacks/test_flower_surface.py."""
    link = consortium.stack.link
    assert link is not None
    marker = tmp_path / "evil-ran"
    out = tmp_path / "replies.json"
    app_dir = tmp_path / "foreign-app"
    app_dir.mkdir()
    (app_dir / "evil_server.py").write_text(FOREIGN_SERVERAPP)
    (app_dir / "evil_client.py").write_text(FOREIGN_CLIENTAPP.format(marker=str(marker)))
    write_bundle_pyproject(
        app_dir, {"serverapp": "evil_server:app", "clientapp": "evil_client:app"}
    )
    run_id = start_run(link, app_dir, {"out": str(out)})

    def finished() -> str | None:
        status = run_status(link, run_id)
        return status if status is not None and status.startswith("finished") else None

    status = wait_for("the foreign run to end", finished, timeout=180)
    # The SuperLink's guarded ServerApp refused the bundle before installing it: the foreign
    # ServerApp never ran, so no site was sent a message of this run.
    assert status == "finished:failed"
    assert link.process is not None
    assert "federation.bundle_not_allowed" in link.process.log_tail(200_000) or (
        "not allowed on this SuperLink" in link.process.log_tail(200_000)
    )
    assert not out.exists()
    assert not marker.exists()
    for hospital in consortium.hospitals:
        assert hospital.supernode is not None
        assert f"[RUN {run_id}" not in hospital.supernode.log_tail(5_000_000)
