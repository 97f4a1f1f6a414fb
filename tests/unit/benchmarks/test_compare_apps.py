"""The comparison ServerApp (CKKS / plaintext FedAvg / Flower SecAgg+), in-process.

SecAgg+ runs for real: Flower's ``SecAggPlusWorkflow`` on this side, the comparison
ClientApp (guard mod, ``secaggplus_mod``, DP training) on the other, each node receiving its
own deserialised copy of every message, as over the wire. The records, traffic and outcome
files are the benchmark's own (the product's ServerApp writes none).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import message_from_proto, message_to_proto

from benchmarks.apps import compare_client
from benchmarks.apps.compare_server import (
    AGGREGATION_KEY,
    CLIENTAPP_REF,
    FEDAVG,
    METHODS,
    RECORDS_DIR_KEY,
    SECAGGPLUS,
    SERVERAPP_REF,
    compare_run_config,
    read_traffic,
    run_compare,
    write_compare_app,
)
from benchmarks.apps.grids import wire_bytes
from benchmarks.apps.metering import MeteredGrid, RoundTraffic
from benchmarks.apps.records import RecordingGate, read_outcome, read_round_records
from concord_protocol.bundle import APP_DIR, bundle_hash
from concord_protocol.bundle import CLIENTAPP_REF as CONCORD_CLIENTAPP_REF
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import new_record
from consortium_server.federation.strategy import BlindAggregationStrategy
from site_node.crypto import EncodedUpdate, PlainCodec, RoundInfo
from site_node.federation.approvals import ApprovalStore
from site_node.federation.clientapp import FederationError
from site_node.federation.processes import BundleRefusedError, check_bundle
from site_node.training import build_model, num_parameters
from tests.support.flower import approve_everywhere, breast_cancer_contract, make_site
from tests.support.inprocess_grid import InProcessGrid, flower_task_identity, site_contexts
from tests.support.replies import train_reply

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    with flower_task_identity():
        yield


class WireGrid(InProcessGrid):
    """Nodes run the comparison ClientApp, each with its own deserialised copy of a
    message, as over the wire (``secaggplus_mod`` edits what it receives; the workflow
    shares one content)."""

    class _Run:
        run_id = 1

    run = _Run()

    def __init__(self, contexts: dict[int, Context]) -> None:
        super().__init__(contexts, client_app=compare_client.app)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return super().send_and_receive(
            [message_from_proto(message_to_proto(m)) for m in messages], timeout=timeout
        )


def _plan(
    tmp_path: Path, *, rounds: int, encryption: bool, method: str | None = None
) -> tuple[RunPlan, dict[int, Context]]:
    contract = breast_cancer_contract(rounds=rounds, encryption=encryption)
    sites = [make_site(tmp_path, i) for i in range(3)]
    public = approve_everywhere(sites, "study-1", contract)
    n = num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2))
    plan = RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=n,
        sites=SITES,
        public_context=public,
        node_wait_s=0.0,
    )
    method = method or ("ckks" if encryption else SECAGGPLUS)
    contexts = site_contexts(sites, compare_run_config(plan, method))
    return plan, contexts


def test_secaggplus_rounds_with_the_real_clientapp_give_the_weighted_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    plan, contexts = _plan(tmp_path, rounds=2, encryption=False)
    trained: dict[int, list[tuple[int, np.ndarray]]] = {}
    real_fit = compare_client.fit

    def spy(runtime: Any, msg: Message, context: Context) -> Message:
        reply = real_fit(runtime, msg, context)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        (vector,) = parameters_to_ndarrays(fitres.parameters)
        round_number = int(str(msg.content.config_records["fitins.config"]["round"]))
        trained.setdefault(round_number, []).append((fitres.num_examples, vector.copy()))
        return reply

    monkeypatch.setattr(compare_client, "fit", spy)
    grid = MeteredGrid(WireGrid(contexts))  # type: ignore[arg-type]
    traffic: list[RoundTraffic] = []
    records = tmp_path / "records"

    outcome = run_compare(
        grid, plan, SECAGGPLUS, hook=lambda _r, t: traffic.append(t), records_dir=records
    )

    assert outcome.status == "completed", outcome.failure
    assert [r.round_number for r in outcome.rounds] == [1, 2]
    for record in outcome.rounds:
        assert record.participants == list(SITES)
        assert record.rejected == []
        assert record.missing_sites == []
        assert record.total_weight == sum(record.sample_counts.values())
        assert 0.0 <= record.evaluation["accuracy"] <= 1.0  # from noisy histograms
        assert record.evaluation["sites"] == 3
        assert all(s > 0 for s in record.site_encrypt_seconds.values())
    eps = outcome.rounds[1].epsilon["hospital-a"]
    assert eps is not None
    assert eps > (outcome.rounds[0].epsilon["hospital-a"] or 0)
    # The unmasked global model is the sample-weighted average of what the sites trained,
    # up to SecAgg+'s quantisation (a step of 16 / 2**22 per site, scaled by the weights).
    assert outcome.final_model is not None
    update = EncodedUpdate.from_bytes_list(outcome.final_model.blobs)
    final = PlainCodec().decrypt_aggregate(
        update.chunks, num_params=plan.num_params, total_weight=1.0
    )
    weights = np.array([n for n, _ in trained[2]], dtype=np.float64)
    expected = sum(n * v for n, v in trained[2]) / weights.sum()
    assert np.max(np.abs(final - expected)) < 3 * (16 / 2**22) * 1000 / weights.sum() + 1e-6
    assert update.header.round_number == 2
    # Four train waves (setup, share keys, masked vectors, unmask) and one evaluate wave.
    for t in traffic:
        assert t.waves == 5
        assert sorted(t.per_site) == list(SITES)
        for site in SITES:
            assert t.per_site[site]["train"].messages == 4
            assert t.per_site[site]["evaluate"].messages == 1
            # masked vectors travel as int64: at least 8 bytes per parameter
            assert t.per_site[site]["train"].sent > 8 * plan.num_params
    # What the ServerApp leaves in its records dir: rounds, traffic, outcome, final model.
    assert read_round_records(records) == outcome.rounds
    assert read_traffic(records) == traffic
    written = read_outcome(records)
    assert written is not None
    assert written.status == "completed"
    assert written.rounds == outcome.rounds
    assert written.final_model == outcome.final_model


def test_fedavg_is_concords_own_loop_through_the_comparison_clientapp(tmp_path: Path) -> None:
    """``fedavg``: Concord's round loop (gated by the benchmark's RecordingGate) with the
    comparison ClientApp serving Concord's own handlers; one train and one evaluate wave."""
    plan, contexts = _plan(tmp_path, rounds=1, encryption=False, method=FEDAVG)
    records = tmp_path / "records"

    outcome = run_compare(MeteredGrid(WireGrid(contexts)), plan, FEDAVG, records_dir=records)  # type: ignore[arg-type]

    assert outcome.status == "completed", outcome.failure
    (record,) = outcome.rounds
    assert record.participants == list(SITES)
    assert record.evaluation["sites"] == 3
    (traffic,) = read_traffic(records)
    assert traffic.waves == 2
    assert all(traffic.site_total(site).messages == 2 for site in SITES)
    assert read_round_records(records) == [record]
    assert outcome.final_model is not None
    assert EncodedUpdate.from_bytes_list(outcome.final_model.blobs).header.scheme == "plain"


def test_secaggplus_needs_an_unencrypted_contract_at_both_ends(tmp_path: Path) -> None:
    plan, contexts = _plan(tmp_path, rounds=1, encryption=True)
    grid = MeteredGrid(WireGrid(contexts))  # type: ignore[arg-type]
    records = tmp_path / "records"

    outcome = run_compare(grid, plan, SECAGGPLUS, records_dir=records)
    assert outcome.status == "failed"
    assert outcome.rounds == []
    assert "encryption disabled" in (outcome.failure or "")
    written = read_outcome(records)  # a waiting script sees the failure
    assert written is not None
    assert written.status == "failed"
    with pytest.raises(ValueError, match="encryption"):
        compare_run_config(plan, SECAGGPLUS)

    # The site refuses too, whatever a server sends (Flower's runner turns the exception
    # into an error reply).
    context = contexts[100]
    context.run_config = {**plan.to_run_config(), AGGREGATION_KEY: SECAGGPLUS}
    msg = Message(
        RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}),
        dst_node_id=100,
        message_type="train",
        group_id="1",
    )
    with pytest.raises(FederationError, match=r"compare\.encryption_required"):
        compare_client.app(msg, context)


def test_plaintext_path_is_weighted_fedavg() -> None:
    """The ``fedavg`` method is Concord's own encryption-off path: sites send ``n_i * w_i``
    in float64, the server sums, the sites divide by the total weight."""
    contract = breast_cancer_contract(rounds=1, encryption=False)
    n = 1000
    plan = RunPlan("study-1", contract, contract.contract_hash(), n, SITES)
    codec = PlainCodec()
    rng = np.random.default_rng(3)
    vectors = [rng.normal(0, 0.1, n) for _ in SITES]
    weights = [120, 45, 300]
    info = RoundInfo(plan.study_id, plan.contract_hash, 1, n)
    replies = [
        train_reply(
            site, node + 1, codec.encode(vector, weight=weight, info=info).to_bytes_list(), weight
        )
        for node, (site, vector, weight) in enumerate(zip(SITES, vectors, weights, strict=True))
    ]
    strategy = BlindAggregationStrategy(plan)

    model = strategy.aggregate_train(1, replies, new_record(plan, 1))

    got = codec.decrypt_aggregate(
        EncodedUpdate.from_bytes_list(model.blobs).chunks,
        num_params=n,
        total_weight=model.total_weight,
    )
    expected = sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights)
    assert model.total_weight == sum(weights)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_recording_gate_writes_each_round_and_stops_only_after_a_failed_one(
    tmp_path: Path,
) -> None:
    contract = breast_cancer_contract(rounds=3, encryption=False)
    plan = RunPlan("study-1", contract, contract.contract_hash(), 10, SITES)
    seen: list[int] = []
    gate = RecordingGate(tmp_path, on_round=lambda r: seen.append(r.round_number))
    done, failed = new_record(plan, 1), new_record(plan, 2)
    done.status = "aggregated"
    failed.status, failed.failure = "failed", "2 valid replies, at least 3 needed"

    assert gate.stop_requested is False
    assert gate.report(done, None).goes_on
    verdict = gate.report(failed, None)

    assert not verdict.goes_on
    assert verdict.reason == failed.failure
    assert seen == [1, 2]
    assert gate.rounds == [done, failed]
    assert read_round_records(tmp_path) == [done, failed]


class _EchoGrid:
    """Every node answers with a fixed payload and its site record."""

    def __init__(self, payload: int) -> None:
        self.payload = payload

    def get_node_ids(self) -> list[int]:
        return [7, 8]

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: Any
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id="g")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Any = None) -> list[Any]:
        out = []
        for msg in messages:
            content = RecordDict(
                {
                    "metrics": MetricRecord({"x": [0.5] * self.payload}),
                    "site": ConfigRecord({"site-id": f"site-{msg.metadata.dst_node_id}"}),
                }
            )
            out.append(Message(content, reply_to=msg))
        return out


def test_metered_grid_counts_bytes_each_way_per_site_and_round() -> None:
    grid = MeteredGrid(_EchoGrid(payload=500))  # type: ignore[arg-type]
    messages = [
        grid.create_message(RecordDict({"c": ConfigRecord({"k": "v" * 100})}), "train", node, "g")
        for node in (7, 8)
    ]
    expected_down = [wire_bytes(m) for m in messages]

    replies = list(grid.send_and_receive(messages))
    grid.send_and_receive([grid.create_message(RecordDict(), "evaluate", 7, "g")])
    first = grid.take(1)

    assert first.waves == 2
    assert sorted(first.per_site) == ["site-7", "site-8"]
    assert first.per_site["site-7"]["train"].received == expected_down[0]
    assert first.per_site["site-8"]["train"].sent == wire_bytes(replies[1])
    assert first.per_site["site-8"]["train"].sent > 8 * 500  # the float payload
    assert first.per_site["site-7"]["evaluate"].messages == 1
    assert first.site_total("site-7").messages == 2
    assert RoundTraffic.from_record(first.as_record()) == first
    assert grid.take(2).per_site == {}


def test_comparison_bundle_names_its_own_apps_and_needs_the_sites_consent(
    tmp_path: Path,
) -> None:
    app_dir = write_compare_app(tmp_path / "app")
    body = tomllib.loads((app_dir / "pyproject.toml").read_text())
    concord = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    components = body["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": SERVERAPP_REF, "clientapp": CLIENTAPP_REF}
    assert CLIENTAPP_REF == "benchmarks.apps.compare_client:app"
    assert SERVERAPP_REF == "benchmarks.apps.compare_server:app"
    config = body["tool"]["flwr"]["app"]["config"]
    concord_config = concord["tool"]["flwr"]["app"]["config"]
    assert config[AGGREGATION_KEY] == "ckks"
    assert config[RECORDS_DIR_KEY] == ""
    assert {k: config[k] for k in concord_config if k != RECORDS_DIR_KEY} == {
        k: v for k, v in concord_config.items() if k != RECORDS_DIR_KEY
    }
    # Every key a comparison run sends is declared (Flower refuses the others) ...
    contract = breast_cancer_contract(rounds=1, encryption=True)
    plan = RunPlan("s", contract, contract.contract_hash(), 10, SITES, public_context=b"p")
    assert set(compare_run_config(plan, "ckks")) <= set(config)
    # ... and Concord's own bundle has no `aggregation` key: only the comparison bundle can
    # select SecAgg+.
    assert AGGREGATION_KEY not in concord_config
    assert set(METHODS) == {"ckks", "fedavg", "secagg+"}

    fab = build_fab_from_disk(app_dir)
    store = ApprovalStore(tmp_path / "site")
    with pytest.raises(BundleRefusedError, match="not allowed"):
        check_bundle(fab, store)
    # Allowed for Concord's ClientApp only, the bundle is still refused: it names another.
    store.allow_fab(bundle_hash(app_dir))
    assert store.allowed_clientapp(bundle_hash(app_dir)) == CONCORD_CLIENTAPP_REF
    with pytest.raises(BundleRefusedError, match="another ClientApp"):
        check_bundle(fab, store)
    store.allow_fab(bundle_hash(app_dir), clientapp=CLIENTAPP_REF)
    accepted = check_bundle(fab, store)
    assert (accepted.digest, accepted.clientapp) == (bundle_hash(app_dir), CLIENTAPP_REF)
