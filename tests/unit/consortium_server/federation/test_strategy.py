"""Blind aggregation strategy and the round loop, in-process.

``InProcessGrid`` stands in for Flower's Grid: it hands each message to the real site
ClientApp (guard mod included) with that node's context, the way a SuperNode would, so the
round loop, the guard, DP training and CKKS run for real without processes. Bad replies are
built with the real codec and then broken.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from concord_protocol.contributions import AggregateManifest
from concord_protocol.dp_plan import step_plan
from concord_protocol.eval_histograms import metrics as eval_metrics
from concord_protocol.wire.format import CKKS_TAG_SLOTS
from consortium_server.federation.plan import RunPlan, SitePeer
from consortium_server.federation.records import RoundFailedError, new_record
from consortium_server.federation.serverapp import run_study_rounds
from consortium_server.federation.strategy import BlindAggregationStrategy
from site_node.crypto import CkksCodec, EncodedUpdate, PlainCodec, RoundInfo
from site_node.crypto.codecs import ListedSum
from site_node.training import build_model, num_parameters
from tests.support.flower import approve_everywhere, breast_cancer_contract, make_site
from tests.support.inprocess_grid import InProcessGrid, flower_task_identity, site_contexts
from tests.support.replies import train_reply
from tests.support.roster import site_keys
from tests.support.runs import RecordingGate

N_PARAMS = 5000


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    with flower_task_identity():
        yield


def _contexts(tmp_path: Path, plan: RunPlan, n: int = 3) -> dict[int, Context]:
    return site_contexts([make_site(tmp_path, i) for i in range(n)], plan.to_run_config())


def _plan(contract_kwargs: dict[str, object], public: bytes | None, **kw: object) -> RunPlan:
    contract = breast_cancer_contract(**contract_kwargs)  # type: ignore[arg-type]
    n = num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2))
    return RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=n,
        sites=("hospital-a", "hospital-b", "hospital-c", "hospital-d"),
        public_context=public,
        node_wait_s=0.0,
        **kw,  # type: ignore[arg-type]
    )


def test_dp_he_rounds_in_process_with_the_real_clientapp(tmp_path: Path) -> None:
    contract = breast_cancer_contract(rounds=2)
    sites = [make_site(tmp_path, i) for i in range(3)]
    public = approve_everywhere(sites, "study-1", contract)
    plan = _plan({"rounds": 2}, public)
    grid = InProcessGrid(_contexts(tmp_path, plan))
    gate = RecordingGate()

    outcome = run_study_rounds(grid, plan, gate=gate)  # type: ignore[arg-type]
    records = gate.records

    assert outcome.status == "completed", outcome.failure
    assert [r.round_number for r in records] == [1, 2]
    assert grid.sent == ["train"] * 3 + ["evaluate"] * 3 + ["train"] * 3 + ["evaluate"] * 3
    for record in records:
        assert record.participants == ["hospital-a", "hospital-b", "hospital-c"]
        assert record.missing_sites == ["hospital-d"]
        assert record.rejected == []
        assert sum(record.sample_counts.values()) == record.total_weight
        # The evaluation is the sum of three noisy histograms: no exact count, no loss.
        assert record.evaluation["sites"] == 3
        assert 0.0 <= record.evaluation["accuracy"] <= 1.0
        assert record.evaluation["noise-sd"] == pytest.approx(
            contract.evaluation_noise() * 3**0.5  # type: ignore[operator]
        )
        assert "loss" not in record.evaluation
        assert record.evaluation["num-examples"] != int(record.evaluation["num-examples"])
        assert record.as_record()["aggregate_digest"] == record.aggregate_digest
        # Each site's signed spend report states its accountant's history: the epsilon it
        # reports, at the plan's sample rate, after whole rounds of steps.
        assert set(record.spend) == set(record.participants)
        assert record.spend_problems == {}
        for site, spend in record.spend.items():
            plan_steps = step_plan(spend.num_samples, contract.training.batch_size)
            assert spend.epsilon == record.epsilon[site]
            assert spend.sample_rate == plan_steps.sample_rate
            per_round = plan_steps.steps_per_epoch * contract.training.local_epochs
            assert spend.steps == record.round_number * per_round
            assert spend.evaluations == record.round_number  # charged with each round
            assert spend.evaluation_noise_multiplier == contract.evaluation_noise()
            assert spend.noise_multiplier > 0
    assert records[1].epsilon["hospital-a"] > records[0].epsilon["hospital-a"]  # type: ignore[operator]
    assert outcome.final_model is not None
    assert outcome.final_model.round_number == 2


@pytest.mark.slow
def test_a_ckks_seeded_study_runs_in_process_with_the_real_clientapp(tmp_path: Path) -> None:
    """The contract's scheme reaches every step: the sites' codec, the strategy's chunk
    size, the blind sum and each site's opening (decryption and tag check) of the aggregate
    before it evaluates it."""
    contract = breast_cancer_contract(rounds=1, scheme="ckks_seeded")
    sites = [make_site(tmp_path, i) for i in range(3)]
    public = approve_everywhere(sites, "study-1", contract)
    plan = _plan({"rounds": 1, "scheme": "ckks_seeded"}, public)
    assert BlindAggregationStrategy(plan).chunk_size == 8192
    grid = InProcessGrid(_contexts(tmp_path, plan))

    outcome = run_study_rounds(grid, plan, gate=RecordingGate())  # type: ignore[arg-type]

    assert outcome.status == "completed", outcome.failure
    (record,) = outcome.rounds
    assert record.participants == ["hospital-a", "hospital-b", "hospital-c"]
    assert record.rejected == []
    assert grid.sent == ["train"] * 3 + ["evaluate"] * 3
    assert record.evaluation["sites"] == 3  # each site opened the aggregate it evaluated
    assert outcome.final_model is not None
    final = EncodedUpdate.from_bytes_list(list(outcome.final_model.blobs))
    assert (final.header.scheme, final.header.format_version) == ("ckks_seeded", 3)
    assert final.header.digest == record.aggregate_digest


def test_unapproved_contract_is_refused_by_the_clientapp_and_the_round_fails(
    tmp_path: Path,
) -> None:
    plan = _plan({"rounds": 1, "encryption": False}, None)
    grid = InProcessGrid(_contexts(tmp_path, plan))  # nothing approved anywhere

    outcome = run_study_rounds(grid, plan, gate=RecordingGate())

    assert outcome.status == "failed"
    (record,) = outcome.rounds
    assert record.status == "failed"
    assert [r.reason for r in record.rejected] == ["error_reply"] * 3
    assert all("contract.not_approved" in r.detail for r in record.rejected)


def test_site_that_does_not_answer_is_dropped_and_two_sites_fail_the_round(
    tmp_path: Path,
) -> None:
    contract = breast_cancer_contract(rounds=1, encryption=False)
    sites = [make_site(tmp_path, i) for i in range(3)]
    approve_everywhere(sites, "study-1", contract)
    plan = _plan({"rounds": 1, "encryption": False}, None)
    grid = InProcessGrid(_contexts(tmp_path, plan), drop=[102])

    outcome = run_study_rounds(grid, plan, gate=RecordingGate())

    assert outcome.status == "failed"
    assert "at least 3 needed" in (outcome.failure or "")
    assert outcome.rounds[0].missing_sites == ["hospital-c", "hospital-d"]


# --- aggregate_train on crafted replies ----------------------------------------------------


ALL_SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")


def _peers(sites: tuple[str, ...] = ALL_SITES) -> tuple[SitePeer, ...]:
    """The roster's sites with their test keys, enrolled as SuperNodes 10, 11, ..."""
    return tuple(
        SitePeer(s, 10 + i, site_keys(s).signing_public_b64, site_keys(s).exchange_public_b64)
        for i, s in enumerate(sites)
    )


def _plain_plan() -> RunPlan:
    contract = breast_cancer_contract(rounds=1, encryption=False, sites=ALL_SITES)
    return RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=N_PARAMS,
        sites=ALL_SITES,
        peers=_peers(),
    )


@pytest.fixture(scope="module")
def ckks_setup() -> tuple[RunPlan, CkksCodec]:
    from site_node.crypto import generate_study_context, public_context

    secret = generate_study_context()
    contract = breast_cancer_contract(rounds=1, sites=ALL_SITES)
    plan = RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=N_PARAMS,
        sites=ALL_SITES,
        public_context=public_context(secret),
        peers=_peers(),
    )
    return plan, CkksCodec(secret, tag_slots=CKKS_TAG_SLOTS)


def _good(
    codec: CkksCodec | PlainCodec, plan: RunPlan, seed: int, site: str = "hospital-a"
) -> list[bytes]:
    vector = np.random.default_rng(seed).normal(0, 0.1, N_PARAMS)
    info = BlindAggregationStrategy(plan).round_info(1)
    return codec.encode(vector, weight=100.0, info=info, site_id=site).to_bytes_list()


Breaker = Callable[[list[bytes]], list[bytes]]


def _corrupt(blobs: list[bytes]) -> list[bytes]:
    update = EncodedUpdate.from_bytes_list(blobs)
    chunks = [bytes(b"\x00" * len(update.chunks[0])), *update.chunks[1:]]
    info = update.header.round_info()
    return (
        type(update).build(info, chunk_size=update.header.chunk_size, chunks=chunks).to_bytes_list()
    )


def _drop_chunk(blobs: list[bytes]) -> list[bytes]:
    return blobs[:-1]


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [(_corrupt, "undecodable_chunk"), (_drop_chunk, "wrong_chunk_count")],
)
def test_bad_ciphertext_reply_is_dropped_with_a_record(
    ckks_setup: tuple[RunPlan, CkksCodec], breaker: Breaker, reason: str
) -> None:
    plan, codec = ckks_setup
    strategy = BlindAggregationStrategy(plan)
    sites = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    replies = [train_reply(s, 10 + i, _good(codec, plan, i, s)) for i, s in enumerate(sites)]
    bad = train_reply("hospital-d", 13, breaker(_good(codec, plan, 3, "hospital-d")))
    record = new_record(plan, 1)

    model = strategy.aggregate_train(1, [*replies[:3], bad], record)

    assert record.participants == sites[:3]
    (rejected,) = record.rejected
    assert rejected.site_id == "hospital-d"
    assert rejected.reason == reason
    assert model.total_weight == 300.0
    manifest = AggregateManifest.from_json(model.manifest)
    assert manifest.sites == tuple(sites[:3])
    total = codec.decrypt_aggregate(
        EncodedUpdate.from_bytes_list(list(model.blobs)).chunks,
        num_params=N_PARAMS,
        total_weight=model.total_weight,
        listed=ListedSum(strategy.round_info(1), manifest.sites),
    )
    expected = np.mean(
        [np.random.default_rng(i).normal(0, 0.1, N_PARAMS) for i in range(3)], axis=0
    )
    assert np.allclose(total, expected, atol=1e-5)


def test_nan_update_is_refused_by_the_site_codec_and_dropped_by_the_server() -> None:
    plan = _plain_plan()
    codec = PlainCodec()
    info = RoundInfo(plan.study_id, plan.contract_hash, 1, N_PARAMS)
    with pytest.raises(Exception, match=r"(?i)finite|nan"):
        codec.encode(np.full(N_PARAMS, np.nan), weight=1.0, info=info)
    # A site that bypasses its codec: the server drops the reply.
    good = [
        train_reply(s, 10 + i, _good(codec, plan, i, s))
        for i, s in enumerate(["hospital-a", "hospital-b", "hospital-c"])
    ]
    update = EncodedUpdate.from_bytes_list(_good(codec, plan, 9))
    nan_chunks = [np.full(len(c) // 8, np.nan).astype("<f8").tobytes() for c in update.chunks]
    poisoned = type(update).build(info, chunk_size=update.header.chunk_size, chunks=nan_chunks)
    record = new_record(plan, 1)

    BlindAggregationStrategy(plan).aggregate_train(
        1, [*good, train_reply("hospital-d", 13, poisoned.to_bytes_list())], record
    )

    assert [r.reason for r in record.rejected] == ["non_finite"]
    assert record.participants == ["hospital-a", "hospital-b", "hospital-c"]


def test_unknown_duplicate_and_bad_weight_replies_fail_a_round_cleanly() -> None:
    plan = _plain_plan()
    codec = PlainCodec()
    replies = [
        train_reply("hospital-a", 10, _good(codec, plan, 0)),
        train_reply("hospital-a", 10, _good(codec, plan, 1)),  # duplicate site
        train_reply("hospital-x", 12, _good(codec, plan, 2)),  # not a study site
        train_reply("hospital-c", 12, _good(codec, plan, 3), n=0),  # bad weight
    ]
    record = new_record(plan, 1)

    with pytest.raises(RoundFailedError) as info:
        BlindAggregationStrategy(plan).aggregate_train(1, replies, record)

    assert info.value.record.status == "failed"
    reasons = sorted(r.reason for r in info.value.record.rejected)
    assert reasons == ["bad_weight", "duplicate_site", "unknown_site"]


def test_contract_minimum_below_policy_is_raised_to_three() -> None:
    contract = breast_cancer_contract(rounds=1).model_copy(
        update={
            "federation": breast_cancer_contract().federation.model_copy(update={"min_sites": 1})
        }
    )
    plan = RunPlan("s", contract, contract.contract_hash(), 10, ("a",), public_context=b"x")
    assert plan.min_sites == 3
    assert RunPlan.from_run_config(plan.to_run_config()) == plan


def _errortrain_reply(node: int, code: int, reason: str) -> Message:
    from flwr.app import Error

    request = Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
    return Message(Error(code=code, reason=reason), reply_to=request)


def test_error_replies_are_named_by_site_and_a_vanished_node_is_only_missing(
    ckks_setup: tuple[RunPlan, CkksCodec],
) -> None:
    plan, codec = ckks_setup
    strategy = BlindAggregationStrategy(plan)
    sites = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]

    def good(site: int, round_number: int) -> Message:
        vector = np.random.default_rng(site).normal(0, 0.1, N_PARAMS)
        blobs = codec.encode(
            vector, weight=100.0, info=strategy.round_info(round_number), site_id=sites[site]
        ).to_bytes_list()
        return train_reply(sites[site], 10 + site, blobs, round_number=round_number)

    first = new_record(plan, 1)
    strategy.aggregate_train(1, [good(i, 1) for i in range(4)], first)
    assert first.rejected == []

    second = new_record(plan, 2)
    vanished = _errortrain_reply(13, 5, "Node Unavailable")
    strategy.aggregate_train(2, [*[good(i, 2) for i in range(3)], vanished], second)
    assert second.rejected == []  # hospital-d's SuperNode went away: missing, not rejected
    assert second.participants == sites[:3]

    third = new_record(plan, 3)
    crashed = _errortrain_reply(13, 0, "ClientApp raised: boom")
    strategy.aggregate_train(3, [*[good(i, 3) for i in range(3)], crashed], third)
    (rejected,) = third.rejected
    assert rejected.site_id == "hospital-d"  # named by its site, not "node-13"
    assert rejected.reason == "error_reply"


def test_spend_reports_are_kept_for_rejected_updates_and_forged_or_missing_ones_noted() -> None:
    """Every site that trained is charged: a site whose update is rejected (here: non-finite)
    still has its signed spend report on the record; a report signed with another site's
    key, or none at all, is a spend problem (the ledger charges the site's whole target).
    A reply from a node that is not the site's enrolled SuperNode changes nothing: an
    outsider cannot make the ledger charge a hospital."""
    plan = _plain_plan()
    codec = PlainCodec()
    info = RoundInfo(plan.study_id, plan.contract_hash, 1, N_PARAMS)
    update = EncodedUpdate.from_bytes_list(_good(codec, plan, 9))
    nan_chunks = [np.full(len(c) // 8, np.nan).astype("<f8").tobytes() for c in update.chunks]
    poisoned = type(update).build(info, chunk_size=update.header.chunk_size, chunks=nan_chunks)
    replies = [
        train_reply("hospital-a", 10, _good(codec, plan, 0), spend_epsilon=0.4),
        train_reply("hospital-b", 11, _good(codec, plan, 1), spend_epsilon=0.5),
        train_reply("hospital-c", 12, _good(codec, plan, 2)),  # no spend report
        train_reply("hospital-d", 13, poisoned.to_bytes_list(), spend_epsilon=0.7),
        # hospital-a's name on node 11 (hospital-b's): refused before its report is read
        train_reply("hospital-a", 11, _good(codec, plan, 3), spend_epsilon=9.0),
    ]
    forged = train_reply(
        "hospital-b", 11, _good(codec, plan, 4), spend_epsilon=0.1, signed_as="hospital-c"
    )
    record = new_record(plan, 1)

    BlindAggregationStrategy(plan).aggregate_train(1, [forged, *replies], record)

    assert [r.reason for r in record.rejected if r.site_id == "hospital-d"] == ["non_finite"]
    assert {s: spend.epsilon for s, spend in record.spend.items()} == {
        "hospital-a": 0.4,
        "hospital-b": 0.5,  # the forged report (first in) was not kept; the real one was
        "hospital-d": 0.7,  # its update was rejected, its spend is still charged
    }
    assert record.spend["hospital-d"].num_samples == 100
    assert record.spend_problems == {"hospital-c": "the reply carries no spend report"}


def test_a_spend_report_for_another_round_or_signed_by_another_site_is_a_problem() -> None:
    plan = _plain_plan()
    codec = PlainCodec()
    replies = [
        train_reply("hospital-a", 10, _good(codec, plan, 0), spend_epsilon=0.4),
        train_reply(
            "hospital-b", 11, _good(codec, plan, 1), spend_epsilon=0.5, signed_as="hospital-a"
        ),
        train_reply("hospital-c", 12, _good(codec, plan, 2), spend_epsilon=0.5),
    ]
    replies[2].content.config_records["site"]["spend-report"] = "{not json"

    # hospital-b's contribution is refused too (same wrong key): the round fails, and the
    # record it fails with still carries every spend and spend problem.
    with pytest.raises(RoundFailedError) as failed:
        BlindAggregationStrategy(plan).aggregate_train(1, replies, new_record(plan, 1))
    record = failed.value.record

    assert set(record.spend) == {"hospital-a"}
    assert "signature" in record.spend_problems["hospital-b"]
    assert record.spend_problems["hospital-c"] == "the spend report does not parse"


def _evaluate_reply(node: int, site: str, counts: list[float], num_classes: int = 2) -> Message:
    from flwr.app import ConfigRecord, MetricRecord

    request = Message(RecordDict(), dst_node_id=node, message_type="evaluate", group_id="1")
    content = RecordDict(
        {
            "metrics": MetricRecord({"histogram": counts, "num-classes": num_classes}),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return Message(content, reply_to=request)


def test_evaluation_is_read_from_the_sum_of_the_sites_noisy_histograms() -> None:
    """Metrics come from the summed histograms (never per-site means); a reply of another
    layout, a non-finite one and a second one for a site already counted are skipped."""
    plan = _plain_plan()
    strategy = BlindAggregationStrategy(plan)
    strategy.node_sites = {10: "hospital-a", 11: "hospital-b", 12: "hospital-c", 13: "hospital-d"}
    bins = plan.contract.evaluation.score_bins
    a = [10.2, 3.1, 1.0, 0.4, 0.3, 1.9, 2.2, 8.7][: 2 * bins]
    b = [4.0, 2.0, 2.5, -0.6, 1.0, 0.2, 3.0, 5.1][: 2 * bins]
    replies = [
        _evaluate_reply(10, "hospital-a", a),
        _evaluate_reply(11, "hospital-b", b),
        _evaluate_reply(12, "hospital-c", [1.0] * (2 * bins + 2)),  # another layout
        _evaluate_reply(13, "hospital-d", [math.inf] + [1.0] * (2 * bins - 1)),
        _evaluate_reply(10, "hospital-a", a),  # hospital-a again
        _evaluate_reply(11, "hospital-c", [100.0] * (2 * bins)),  # node 11 is hospital-b's
    ]

    out = strategy.aggregate_evaluate(replies)

    summed = [x + y for x, y in zip(a, b, strict=True)]
    expected = eval_metrics(summed, num_classes=2, bins=bins)
    assert out["sites"] == 2
    assert out["accuracy"] == pytest.approx(expected["accuracy"])
    assert out["auc"] == pytest.approx(expected["auc"])
    assert out["num-examples"] == pytest.approx(sum(max(v, 0.0) for v in summed))
    assert out["noise-sd"] == pytest.approx(plan.contract.evaluation_noise() * 2**0.5)  # type: ignore[operator]


def test_a_segmentation_study_reads_dice_and_hd95_from_the_summed_histograms() -> None:
    """The layout is the contract's task's, whatever a reply claims: a classification-sized
    histogram in a segmentation study is skipped."""
    from concord_protocol.contract import TaskSpec
    from concord_protocol.eval_histograms import HD95_EDGES, segmentation_histogram

    plain = _plain_plan()
    contract = plain.contract.model_copy(update={"task": TaskSpec(kind="segmentation")})
    plan = dataclasses.replace(plain, contract=contract, contract_hash=contract.contract_hash())
    strategy = BlindAggregationStrategy(plan)
    strategy.node_sites = {10: "hospital-a", 11: "hospital-b", 12: "hospital-c"}
    bins = contract.evaluation.score_bins
    a = segmentation_histogram([0.9, 0.8, 0.7], [1.0, 2.5, 3.0], bins=bins).tolist()
    b = segmentation_histogram([0.2, 0.95], [40.0, 0.5], bins=bins).tolist()
    replies = [
        _evaluate_reply(10, "hospital-a", a),
        _evaluate_reply(11, "hospital-b", b),
        _evaluate_reply(12, "hospital-c", [1.0] * (2 * bins)),  # a classification layout
    ]

    out = strategy.aggregate_evaluate(replies)

    expected = eval_metrics(
        [x + y for x, y in zip(a, b, strict=True)], num_classes=2, bins=bins, task="segmentation"
    )
    assert len(a) == bins * len(HD95_EDGES)
    assert out["sites"] == 2
    assert out["num-examples"] == 5
    assert out["dice"] == pytest.approx(expected["dice"])
    assert out["hd95"] == pytest.approx(expected["hd95"])
    assert "accuracy" not in out


def test_a_contract_without_evaluation_releases_sends_no_evaluate(tmp_path: Path) -> None:
    contract = breast_cancer_contract(rounds=1, encryption=False)
    quiet = contract.model_copy(
        update={"evaluation": contract.evaluation.model_copy(update={"mode": "none"})}
    )
    sites = [make_site(tmp_path, i) for i in range(3)]
    approve_everywhere(sites, "study-1", quiet)
    plan = _plan({"rounds": 1, "encryption": False}, None)
    plan = dataclasses.replace(plan, contract=quiet, contract_hash=quiet.contract_hash())
    grid = InProcessGrid(_contexts(tmp_path, plan))

    outcome = run_study_rounds(grid, plan, gate=RecordingGate())

    assert outcome.status == "completed", outcome.failure
    assert grid.sent == ["train"] * 3
    (record,) = outcome.rounds
    assert record.evaluation == {}
    assert all(spend.evaluations == 0 for spend in record.spend.values())
