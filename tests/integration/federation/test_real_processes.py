"""Real Flower processes on loopback: SuperLink + 3 SuperNodes, TLS, SuperNode auth, DP + HE.

One module-scoped federation (SuperLink with TLS and SuperNode authentication, three
registered SuperNodes, one per demo hospital) runs a breast-cancer study for a few rounds.
The study key is made by hospital-a and reaches the others sealed to their X25519 keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from concord_demo.stack import start_registered_supernode
from concord_protocol.bundle import APP_DIR
from concord_protocol.contract import StudyContract
from concord_protocol.processes import ManagedProcess
from consortium_server.federation.processes import SuperLinkHandle, run_study, start_superlink
from consortium_server.federation.strategy import RunPlan, StudyOutcome
from site_node.crypto import (
    CkksCodec,
    EncodedUpdate,
    SiteKeyPair,
    generate_study_context,
    open_study_key,
    public_context,
    seal_study_key,
)
from site_node.data import breast_cancer_holdout, breast_cancer_site
from site_node.federation.approvals import ApprovalStore
from site_node.federation.processes import SuperNodeSpec, start_supernode
from site_node.training import build_model, centralised_baseline, evaluate, num_parameters
from site_node.training.params import unflatten_into
from tests.support.flower import (
    SiteFixture,
    breast_cancer_contract,
    free_port,
    make_site,
    make_supernode_key,
    make_tls,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Federation:
    root: Path
    link: SuperLinkHandle
    sites: list[SiteFixture]
    nodes: list[ManagedProcess]
    keys: dict[str, SiteKeyPair]
    ca: Path


def _num_params(contract: StudyContract) -> int:
    return num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2))


def _share_study_key(fed: Federation, study_id: str, contract: StudyContract) -> bytes:
    """hospital-a makes the key and seals it to the others; returns the public context."""
    sender = fed.sites[0]
    secret = generate_study_context()
    ApprovalStore(sender.state_dir).save_study_key(study_id, secret, sender_id=sender.site_id)
    for site in fed.sites[1:]:
        sealed = seal_study_key(
            secret,
            sender_id=sender.site_id,
            sender_signing_key=fed.keys[sender.site_id].signing_key,
            recipient_id=site.site_id,
            recipient_exchange_public=fed.keys[site.site_id].exchange_public,
            study_id=study_id,
            contract_hash=contract.contract_hash(),
        )
        opened = open_study_key(
            sealed,
            recipient_exchange_private=fed.keys[site.site_id].exchange_key,
            sender_signing_public=fed.keys[sender.site_id].signing_public,
            expected_study_id=study_id,
            expected_contract_hash=contract.contract_hash(),
            expected_recipient_id=site.site_id,
        )
        ApprovalStore(site.state_dir).save_study_key(study_id, opened, sender_id=sender.site_id)
    return public_context(secret)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    tls = make_tls(root / "tls")
    link = start_superlink(root / "superlink", port=free_port(), tls=tls)
    nodes: list[ManagedProcess] = []
    sites = [make_site(root / "sites", i) for i in range(3)]
    keys = {s.site_id: SiteKeyPair.generate() for s in sites}
    try:
        for site in sites:
            nodes.append(
                start_registered_supernode(
                    link,
                    tls.ca_cert,
                    site_id=site.site_id,
                    state_dir=site.state_dir,
                    datasets_file=site.datasets_file,
                )
            )
        yield Federation(root, link, sites, nodes, keys, tls.ca_cert)
    finally:
        for node in nodes:
            node.stop()
        link.stop()


def _plan(fed: Federation, study_id: str, contract: StudyContract, public: bytes | None) -> RunPlan:
    return RunPlan(
        study_id=study_id,
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=_num_params(contract),
        sites=tuple(s.site_id for s in fed.sites),
        public_context=public,
        records_dir=fed.root / "records" / study_id,
        node_wait_s=60.0,
    )


def _decrypt_final(outcome: StudyOutcome, secret: bytes, num_params: int) -> list[float]:
    assert outcome.final_model is not None
    update = EncodedUpdate.from_bytes_list(list(outcome.final_model.blobs))
    vector = CkksCodec(secret).decrypt_aggregate(
        update.chunks, num_params=num_params, total_weight=outcome.final_model.total_weight
    )
    return [float(v) for v in vector]


def test_dp_he_study_on_real_processes_beats_chance(federation: Federation) -> None:
    fed = federation
    contract = breast_cancer_contract(rounds=3, epsilon=8.0)
    study_id = "study-bc-1"
    for site in fed.sites:
        ApprovalStore(site.state_dir).approve(study_id, contract, contract.contract_hash())
    public = _share_study_key(fed, study_id, contract)
    plan = _plan(fed, study_id, contract, public)

    outcome = run_study(fed.link, plan, app_dir=APP_DIR, work_dir=fed.root / "runs")

    assert outcome.status == "completed", (outcome.failure, fed.link.process.log_tail())
    assert [r.round_number for r in outcome.rounds] == [1, 2, 3]
    sizes = {s.site_id: len(breast_cancer_site(s.index)[0]) for s in fed.sites}
    for record in outcome.rounds:
        assert record.status == "aggregated"
        assert record.participants == sorted(sizes)
        assert record.sample_counts == sizes
        assert record.total_weight == sum(sizes.values())
        assert all(e is not None and 0 < e <= 8.0 + 1e-6 for e in record.epsilon.values())
        assert set(record.site_digests) == set(sizes)
        assert record.aggregate_digest
        assert record.rejected == []
        assert record.evaluation["sites"] == 3.0
    eps = [outcome.rounds[i].epsilon["hospital-a"] for i in range(3)]
    assert eps == sorted(eps)  # the accountant persists across rounds (and processes)

    # The server holds only ciphertexts; a site decrypts the final model.
    secret = ApprovalStore(fed.sites[1].state_dir).study_key(study_id)
    assert secret is not None
    model = build_model(contract.model, input_shape=(30,), num_classes=2)
    vector = _decrypt_final(outcome, secret.secret_context, plan.num_params)
    import numpy as np

    unflatten_into(model, np.asarray(vector))
    holdout = breast_cancer_holdout()
    result = evaluate(model, holdout)
    baseline = centralised_baseline(
        [breast_cancer_site(i)[0] for i in range(3)], holdout, contract.model, contract.training
    )
    print(
        f"\nfederated DP+HE: accuracy {result.accuracy:.3f} AUC {result.auc:.3f}; "
        f"centralised non-private: accuracy {baseline.metrics.accuracy:.3f} "
        f"AUC {baseline.metrics.auc:.3f}; rounds "
        + ", ".join(f"{r.wall_seconds:.1f}s" for r in outcome.rounds)
    )
    majority = max(np.bincount(holdout.labels.numpy())) / len(holdout)
    assert result.accuracy > majority + 0.15
    assert result.auc > 0.9


def test_run_of_unapproved_contract_is_refused_by_every_site(federation: Federation) -> None:
    fed = federation
    contract = breast_cancer_contract(rounds=1, title="Never approved anywhere", encryption=False)
    plan = _plan(fed, "study-unapproved", contract, None)

    outcome = run_study(fed.link, plan, app_dir=APP_DIR, work_dir=fed.root / "runs")

    assert outcome.status == "failed"
    (record,) = outcome.rounds
    assert record.participants == []
    assert len(record.rejected) == 3
    assert all(r["reason"] == "error_reply" for r in record.rejected)
    assert all("contract.not_approved" in r["detail"] for r in record.rejected)


def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    fed = federation
    site = make_site(fed.root / "intruder", 0)
    private, _ = make_supernode_key(site.state_dir / "keys")
    spec = SuperNodeSpec(
        site_id="intruder",
        state_dir=site.state_dir,
        datasets_file=site.datasets_file,
        superlink_address=fed.link.address,
        root_certificates=fed.ca,
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


def test_run_with_a_foreign_app_bundle_is_refused_and_runs_no_code(
    federation: Federation, tmp_path: Path
) -> None:
    fed = federation
    contract = breast_cancer_contract(rounds=1, title="Approved but foreign bundle")
    study_id = "study-foreign-bundle"
    for site in fed.sites:
        ApprovalStore(site.state_dir).approve(study_id, contract, contract.contract_hash())
    public = _share_study_key(fed, study_id, contract)
    marker = tmp_path / "evil-ran"
    app_dir = tmp_path / "foreign-app"
    app_dir.mkdir()
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    (app_dir / "pyproject.toml").write_text(
        pyproject.replace('"site_node.federation.clientapp:app"', '"evil:app"')
    )
    (app_dir / "evil.py").write_text(
        "from pathlib import Path\n"
        "from flwr.clientapp import ClientApp\n"
        "app = ClientApp()\n"
        "@app.train()\n"
        "def train(msg, context):\n"
        f"    Path({str(marker)!r}).write_text('ran')\n"
        "    raise RuntimeError('foreign code ran')\n"
    )
    plan = _plan(fed, study_id, contract, public)

    outcome = run_study(fed.link, plan, app_dir=app_dir, work_dir=fed.root / "runs")

    assert outcome.status == "failed"
    (record,) = outcome.rounds
    assert record.participants == []
    assert len(record.rejected) == 3
    assert all("not allowed at this site" in r["detail"] for r in record.rejected)
    assert not marker.exists()
