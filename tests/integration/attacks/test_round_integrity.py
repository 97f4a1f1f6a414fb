"""Attacks on a round's data, by a malicious server or a rogue node: each one fails, and says so.

Three hospitals run two honest DP + CKKS rounds with the real site ClientApp (in-process,
``InProcessGrid``: the attack is on the data, not on processes). Then the attacker, holding
everything the server holds (the public context, every ciphertext, every manifest, the
run config) plus, where said, a captured ciphertext of another round, sends the sites
what it likes:

* a plaintext added to an aggregate (anyone can, with the public context);
* an aggregate with a listed contribution dropped, or swapped for another round's;
* another round's aggregate under a new round number;
* an inflated divisor;
* a second evaluation of a round;
* at release, one site's ciphertext alone (the decryption oracle), or a round that is not
  the final one.

And at the server, a rogue node answers for a site (impersonation), an old round's reply is
replayed, and a weight is inflated. Every site refusal carries a stable ``aggregate.*``,
``evaluation.*`` or ``release.*`` code; a refused evaluation reaches the round's record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Context, Message, RecordDict

from concord_protocol.contributions import AggregateManifest
from concord_protocol.wire.format import EncodedUpdate, EncryptedUpdate
from concord_protocol.wire.messages import REC_CONFIG, REC_GLOBAL, arrays_to_blobs, blobs_to_arrays
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.plan import RunPlan, SitePeer
from consortium_server.federation.records import new_record
from consortium_server.federation.serverapp import run_study_rounds
from consortium_server.federation.strategy import BlindAggregationStrategy
from site_node.crypto.codecs import CkksCodec
from site_node.federation import clientapp
from site_node.federation.aggregates import AggregateRefusedError, RoundLedger
from site_node.federation.approvals import ApprovalStore
from site_node.release import ReleaseError, decrypt_final_model
from site_node.training import build_model, num_parameters
from tests.support.flower import (
    SiteFixture,
    approve_everywhere,
    breast_cancer_contract,
    make_site,
)
from tests.support.inprocess_grid import InProcessGrid, flower_task_identity, site_contexts
from tests.support.replies import train_reply
from tests.support.roster import site_keys
from tests.support.runs import RecordingGate

pytestmark = [pytest.mark.integration]

SITES = ("hospital-a", "hospital-b", "hospital-c")
STUDY = "study-attacks"


@dataclass
class Honest:
    """Two honest rounds and everything an attacker at the server holds afterwards."""

    plan: RunPlan
    secret: bytes
    sites: list[SiteFixture]
    contexts: dict[int, Context]
    models: list[GlobalModel]  # round 1, round 2 (the final one)

    @property
    def public(self) -> bytes:
        assert self.plan.public_context is not None
        return self.plan.public_context

    def strategy(self) -> BlindAggregationStrategy:
        return BlindAggregationStrategy(self.plan)

    def codec(self) -> CkksCodec:
        """The sites' codec: what the test uses to make the ciphertext a site *would* have
        sent (an attacker who captured it holds exactly these bytes)."""
        return CkksCodec(self.secret, tag_slots=self.strategy().tag_slots)


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Honest]:
    root = tmp_path_factory.mktemp("attacks")
    contract = breast_cancer_contract(rounds=2)
    sites = [make_site(root, i) for i in range(3)]
    public = approve_everywhere(sites, STUDY, contract)
    key = ApprovalStore(sites[0].state_dir).study_key(STUDY)
    assert key is not None
    assert public is not None
    n = num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2))
    plan = RunPlan(
        study_id=STUDY,
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=n,
        sites=SITES,
        public_context=public,
        node_wait_s=0.0,
        peers=tuple(
            SitePeer(s, 100 + i, site_keys(s).signing_public_b64, site_keys(s).exchange_public_b64)
            for i, s in enumerate(SITES)
        ),
    )
    contexts = site_contexts(sites, plan.to_run_config())
    gate = RecordingGate()
    with flower_task_identity():
        outcome = run_study_rounds(InProcessGrid(contexts), plan, gate=gate)  # type: ignore[arg-type]
        assert outcome.status == "completed", outcome.failure
        models = [m for m in gate.models if m is not None]
        assert [m.round_number for m in models] == [1, 2]
        yield Honest(plan, key.secret_context, sites, contexts, models)


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    with flower_task_identity():
        yield


# --- the attacker's tools ------------------------------------------------------------------


def _chunks(model: GlobalModel) -> list[bytes]:
    return list(EncodedUpdate.from_bytes_list(list(model.blobs)).chunks)


def _sum(public: bytes, *updates: list[bytes]) -> list[bytes]:
    """The chunk-wise sum of ``updates`` with the public context (as the server sums)."""
    ctx = ts.context_from(public)
    out = []
    for parts in zip(*updates, strict=True):
        acc = ts.ckks_vector_from(ctx, parts[0])
        for part in parts[1:]:
            acc = acc + ts.ckks_vector_from(ctx, part)
        out.append(bytes(acc.serialize()))
    return out


def _rebuild(
    honest: Honest, model: GlobalModel, chunks: list[bytes], **changes: Any
) -> GlobalModel:
    """``model`` with other chunks (a fresh header naming them, as the server can make)."""
    round_number = int(changes.pop("round_number", model.round_number))
    info = honest.strategy().round_info(round_number)
    update = EncryptedUpdate.build(info, chunk_size=honest.codec().chunk_size, chunks=chunks)
    return dataclasses.replace(
        model,
        round_number=round_number,
        blobs=tuple(update.to_bytes_list()),
        digest=update.digest,
        **changes,
    )


def _add_plaintext(public: bytes, chunk: bytes, index: int, value: float) -> bytes:
    """Add ``value`` to slot ``index`` of a ciphertext with the public context alone."""
    ctx = ts.context_from(public)
    vec = ts.ckks_vector_from(ctx, chunk)
    plain = np.zeros(vec.size())
    plain[index] = value
    return bytes((vec + plain.tolist()).serialize())


def _site_update(honest: Honest, site: str, round_number: int, seed: int) -> list[bytes]:
    """The chunks of the weighted update ``site`` sends in ``round_number`` (a capture)."""
    vector = np.random.default_rng(seed).normal(0, 0.1, honest.plan.num_params)
    info = honest.strategy().round_info(round_number)
    return list(honest.codec().encode(vector, weight=100.0, info=info, site_id=site).chunks)


def _message(honest: Honest, kind: str, round_number: int, model: GlobalModel) -> Message:
    content = honest.strategy().content(round_number, model)
    return Message(content, dst_node_id=100, message_type=kind, group_id=f"{STUDY}/{round_number}")


def _first_attempt(honest: Honest) -> None:
    """Forget the rounds the sites locked after a failed integrity check, so that the next
    attack is judged as the first one of its round (a real site, once locked, refuses every
    other aggregate of that round: ``test_one_failed_aggregate_locks_its_round``)."""
    for fixture in honest.sites:
        ledger = RoundLedger(fixture.state_dir, STUDY, honest.plan.contract_hash)
        if ledger.path.is_file():
            data = json.loads(ledger.path.read_text())
            data.pop("integrity_failures", None)
            ledger.path.write_text(json.dumps(data))


def _refusal(honest: Honest, kind: str, round_number: int, model: GlobalModel) -> str:
    """What hospital-a's ClientApp says to the message: the refusal's code."""
    _first_attempt(honest)
    with pytest.raises(AggregateRefusedError) as refused:
        clientapp.app(_message(honest, kind, round_number, model), honest.contexts[100])
    return refused.value.code


def _refusals(honest: Honest, model: GlobalModel) -> list[str]:
    """The refusals of training on ``model`` (the next round starts from it) and of
    evaluating it."""
    train_round = model.round_number + 1
    return [
        _refusal(honest, "train", train_round, model),
        _refusal(honest, "evaluate", model.round_number, model),
    ]


# --- a malicious server, at the sites --------------------------------------------------------


def test_the_honest_aggregates_check_out_at_every_site(honest: Honest) -> None:
    """The control: the unaltered round-1 aggregate checks out and is evaluated again
    (the answer already given)."""
    model = honest.models[0]
    reply = clientapp.app(_message(honest, "evaluate", 1, model), honest.contexts[101])
    assert not reply.has_error()
    again = clientapp.app(_message(honest, "evaluate", 1, model), honest.contexts[101])
    assert dict(again.content.metric_records["metrics"]) == dict(
        reply.content.metric_records["metrics"]
    )


def test_a_plaintext_added_to_the_aggregate_is_refused(honest: Honest) -> None:
    model = honest.models[0]
    chunks = _chunks(model)
    for value in (1.0, 0.1):  # in weighted units: 0.1 is below 1e-3 in the averaged model
        nudged = _add_plaintext(honest.public, chunks[0], 7, value)
        forged = _rebuild(honest, model, [nudged, *chunks[1:]])
        assert _refusals(honest, forged) == ["aggregate.integrity_failed"] * 2
    # Adding to the tag slots as well does not help: the attacker does not know the tags'
    # coefficients, so it cannot say what to add there.
    nudged = _add_plaintext(honest.public, chunks[0], 7, 1.0)
    last = EncodedUpdate.from_bytes_list(list(model.blobs)).header.chunk_length(0) - 1
    both = _add_plaintext(honest.public, nudged, last, 1.0)
    forged = _rebuild(honest, model, [both, *chunks[1:]])
    assert _refusals(honest, forged) == ["aggregate.integrity_failed"] * 2


def test_one_failed_aggregate_locks_its_round(honest: Honest) -> None:
    """The tags are one-time keys: a server allowed to try again would learn a bit about
    them per refusal. After one aggregate of a round fails them, the site opens no other
    aggregate of that round, not even the honest one; other rounds are not affected."""
    model = honest.models[0]
    chunks = _chunks(model)
    forged = _rebuild(
        honest, model, [_add_plaintext(honest.public, chunks[0], 7, 1.0), *chunks[1:]]
    )
    assert _refusal(honest, "evaluate", 1, forged) == "aggregate.integrity_failed"
    for kind, round_number in (("evaluate", 1), ("train", 2)):
        with pytest.raises(AggregateRefusedError) as refused:
            clientapp.app(_message(honest, kind, round_number, model), honest.contexts[100])
        assert refused.value.code == "aggregate.round_locked"
    _first_attempt(honest)  # leave the module's shared sites as the other tests expect


def test_a_dropped_contribution_is_refused(honest: Honest) -> None:
    model = honest.models[0]
    manifest = AggregateManifest.from_json(model.manifest)
    # hospital-c left out of the sum, the manifest still listing it: the server holds each
    # site's ciphertext and can sum any subset, here a's and b's.
    two = [_site_update(honest, s, 1, i) for i, s in enumerate(SITES[:2])]
    forged = _rebuild(honest, model, _sum(honest.public, *two))
    assert _refusals(honest, forged) == ["aggregate.integrity_failed"] * 2
    # Dropped from the manifest too: two contributions are below the study's minimum.
    shorter = AggregateManifest.of(
        list(manifest.contributions[:2]),
        study_id=STUDY,
        contract_hash=honest.plan.contract_hash,
        round_number=1,
    )
    forged = dataclasses.replace(
        model,
        manifest=shorter.to_json(),
        total_weight=float(shorter.total_weight),
    )
    assert _refusals(honest, forged) == ["aggregate.too_few_sites"] * 2
    # Without any manifest, nothing is believed.
    assert (
        _refusals(honest, dataclasses.replace(model, manifest=""))
        == ["aggregate.manifest_missing"] * 2
    )


def test_a_swapped_contribution_or_another_rounds_aggregate_is_refused(honest: Honest) -> None:
    round2 = honest.models[1]
    # Round 1's aggregate under round 2's header and manifest.
    replayed = _rebuild(honest, round2, _chunks(honest.models[0]), round_number=2)
    assert _refusal(honest, "evaluate", 2, replayed) == "aggregate.integrity_failed"
    # hospital-b's part swapped for its (captured) round-1 ciphertext: the others' round-2
    # contributions cannot be re-made by the attacker, so it swaps in b's round 1 update
    # on top of a round-2 sum of a and c.
    a2, c2 = _site_update(honest, "hospital-a", 2, 10), _site_update(honest, "hospital-c", 2, 12)
    b1 = _site_update(honest, "hospital-b", 1, 11)
    swapped = _rebuild(honest, round2, _sum(honest.public, a2, b1, c2))
    assert _refusal(honest, "evaluate", 2, swapped) == "aggregate.integrity_failed"
    # The tags bind the round and the listed sites, not which of a site's updates: a
    # site makes one update per round (its reply cache answers a repeated round the same),
    # so another set of round-2 updates can only come from the sites' own codec, as here;
    # even then the round was answered already, and is not evaluated again.
    b2 = _site_update(honest, "hospital-b", 2, 11)
    rebuilt = _rebuild(honest, round2, _sum(honest.public, a2, b2, c2))
    assert _refusal(honest, "evaluate", 2, rebuilt) == "evaluation.already_answered"
    assert _refusal(honest, "evaluate", 2, swapped) == "aggregate.integrity_failed"
    # A manifest of round 1 with round 2's aggregate: the contributions name round 1.
    wrong = dataclasses.replace(round2, manifest=honest.models[0].manifest)
    assert _refusal(honest, "evaluate", 2, wrong) == "aggregate.wrong_round"
    # Round 1's aggregate sent to start round 3 (it must be round 2's).
    assert _refusal(honest, "train", 3, honest.models[0]) == "aggregate.wrong_round"


def test_an_inflated_divisor_is_refused(honest: Honest) -> None:
    model = honest.models[0]
    inflated = dataclasses.replace(model, total_weight=model.total_weight * 10)
    assert _refusals(honest, inflated) == ["aggregate.weight_mismatch"] * 2


def test_a_round_is_evaluated_once(honest: Honest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same aggregate asked again gets the answer already given, without touching the
    test set again; the ledger refuses any other aggregate for an answered round."""
    calls: list[int] = []
    real = clientapp.noisy_histogram

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(clientapp, "noisy_histogram", counting)
    model = honest.models[1]
    first = clientapp.app(_message(honest, "evaluate", 2, model), honest.contexts[102])
    second = clientapp.app(_message(honest, "evaluate", 2, model), honest.contexts[102])
    assert calls == []  # round 2 was answered in the honest run: never evaluated again
    assert dict(first.content.metric_records["metrics"]) == dict(
        second.content.metric_records["metrics"]
    )
    ledger = RoundLedger(honest.sites[2].state_dir, STUDY, honest.plan.contract_hash)
    with pytest.raises(AggregateRefusedError) as refused, ledger.evaluation(2, "0" * 64):
        pass
    assert refused.value.code == "evaluation.already_answered"


def test_a_round_the_site_did_not_train_is_not_evaluated(honest: Honest) -> None:
    """Each evaluation release is charged when its round is trained; a server that asks a
    site to score an aggregate of a round the site did not train (here round 3 of a 2-round
    study, with the final aggregate) gets a refusal, not an unbudgeted release."""
    assert _refusal(honest, "evaluate", 3, honest.models[1]) == "evaluation.not_trained"


def test_an_evaluation_reply_is_a_noisy_histogram_and_nothing_else(honest: Honest) -> None:
    """What leaves the site about its test split: the noisy histogram, its layout and noise
    level. No loss, no exact count, no per-site accuracy."""
    reply = clientapp.app(_message(honest, "evaluate", 1, honest.models[0]), honest.contexts[100])
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) == {"histogram", "num-classes", "score-bins", "noise-multiplier"}
    bins = honest.plan.contract.evaluation.score_bins
    assert len(metrics["histogram"]) == 2 * bins  # type: ignore[arg-type]
    assert metrics["noise-multiplier"] == honest.plan.contract.evaluation_noise()
    counts = metrics["histogram"]
    assert any(c != round(c) for c in counts)  # type: ignore[union-attr]


def test_a_refused_evaluation_reaches_the_rounds_record(honest: Honest, tmp_path: Path) -> None:
    """A tampered aggregate on its way to the sites: they refuse to evaluate it, and the
    round's record (what the audit entry holds) lists each refusal with its code."""

    class Tampering(InProcessGrid):
        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            out = []
            for msg in messages:
                if msg.metadata.message_type == "evaluate":
                    data = arrays_to_blobs(msg.content.array_records[REC_GLOBAL])
                    update = EncodedUpdate.from_bytes_list(data)
                    chunk = _add_plaintext(honest.public, update.chunks[0], 3, 0.5)
                    forged = EncryptedUpdate.build(
                        update.header.round_info(),
                        chunk_size=update.header.chunk_size,
                        chunks=[chunk, *update.chunks[1:]],
                    )
                    content = RecordDict({REC_CONFIG: msg.content.config_records[REC_CONFIG]})
                    content[REC_GLOBAL] = blobs_to_arrays(forged.to_bytes_list())
                    msg = Message(
                        content,
                        dst_node_id=msg.metadata.dst_node_id,
                        message_type="evaluate",
                        group_id="x",
                    )
                try:
                    out.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
                except AggregateRefusedError as exc:
                    from flwr.app import Error

                    out.append(Message(Error(code=0, reason=str(exc)), reply_to=msg))
            return out

    sites = [make_site(tmp_path, i) for i in range(3)]
    contract = breast_cancer_contract(rounds=1)
    public = approve_everywhere(sites, STUDY, contract)
    plan = dataclasses.replace(
        honest.plan,
        contract=contract,
        contract_hash=contract.contract_hash(),
        public_context=public,
    )
    gate = RecordingGate()
    run_study_rounds(Tampering(site_contexts(sites, plan.to_run_config())), plan, gate=gate)  # type: ignore[arg-type]
    (record,) = gate.records
    assert sorted(r.site_id for r in record.evaluation_refusals) == list(SITES)
    assert all("aggregate.integrity_failed" in r.detail for r in record.evaluation_refusals)
    assert record.as_record()["evaluation_refusals"]


# --- the release step is no decryption oracle ---------------------------------------------


def _release(honest: Honest, model: GlobalModel, site: int = 1) -> Any:
    """What hospital-b does with ``model`` served as the study's final aggregate."""
    import base64

    header = EncodedUpdate.from_bytes_list(list(model.blobs)).header
    served = {
        "study_id": STUDY,
        "contract_hash": honest.plan.contract_hash,
        "round_number": model.round_number,
        "scheme": "ckks",
        "num_params": header.num_params,
        "total_weight": model.total_weight,
        "digest": model.digest,
        "blobs": [base64.b64encode(b).decode() for b in model.blobs],
        "manifest": model.manifest,
    }
    fixture = honest.sites[site]
    _first_attempt(honest)
    return decrypt_final_model(
        served,
        STUDY,
        store=ApprovalStore(fixture.state_dir),
        site_id=fixture.site_id,
        keys=site_keys(fixture.site_id),
    )


def test_release_decrypts_only_the_verified_final_aggregate(honest: Honest) -> None:
    final = honest.models[1]
    # One site's update alone, served as "the final aggregate" with that site's weight
    # and a manifest of that site only: refused (and no decryption happens).
    alone = _site_update(honest, "hospital-a", 2, 10)
    manifest = AggregateManifest.from_json(final.manifest)
    only_a = AggregateManifest.of(
        [manifest.contributions[0]],
        study_id=STUDY,
        contract_hash=honest.plan.contract_hash,
        round_number=2,
    )
    oracle = _rebuild(
        honest, final, alone, manifest=only_a.to_json(), total_weight=float(only_a.total_weight)
    )
    with pytest.raises(ReleaseError) as refused:
        _release(honest, oracle)
    assert refused.value.code == "aggregate.too_few_sites"
    # The same with the real manifest: the tags say it is not the listed sum.
    oracle = _rebuild(honest, final, alone)
    with pytest.raises(ReleaseError) as refused:
        _release(honest, oracle)
    assert refused.value.code == "aggregate.integrity_failed"
    # Round 1's (verified) aggregate is not the final one.
    with pytest.raises(ReleaseError) as refused:
        _release(honest, honest.models[0])
    assert refused.value.code == "release.not_final"
    # The real final aggregate is released, at every site to the same bytes...
    _, model_b = _release(honest, final, site=1)
    _, model_c = _release(honest, final, site=2)
    assert model_b == model_c
    # ...and only that one: another "final" aggregate afterwards is refused before anything
    # is decrypted (here one the tags would refuse anyway).
    chunks = _chunks(final)
    plus = _rebuild(honest, final, [_add_plaintext(honest.public, chunks[0], 1, 1.0), *chunks[1:]])
    with pytest.raises(ReleaseError) as refused:
        _release(honest, plus, site=1)
    assert refused.value.code == "release.not_final"


# --- a rogue node and replays, at the server ---------------------------------------------


def _good_replies(honest: Honest, round_number: int) -> list[Message]:
    codec, info = honest.codec(), honest.strategy().round_info(round_number)
    replies = []
    for i, site in enumerate(SITES):
        vector = np.random.default_rng(i).normal(0, 0.1, honest.plan.num_params)
        blobs = codec.encode(vector, weight=100.0, info=info, site_id=site).to_bytes_list()
        replies.append(train_reply(site, 100 + i, blobs, round_number=round_number))
    return replies


def test_a_rogue_node_cannot_answer_for_a_site(honest: Honest) -> None:
    strategy = honest.strategy()
    good = _good_replies(honest, 1)
    codec, info = honest.codec(), strategy.round_info(1)
    poison = codec.encode(
        np.full(honest.plan.num_params, 0.5), weight=100.0, info=info, site_id="hospital-a"
    ).to_bytes_list()
    # A rogue node (not hospital-a's enrolled SuperNode) answers first, as hospital-a.
    rogue = train_reply("hospital-a", 999, poison, round_number=1, signed_as="hospital-b")
    # hospital-a's own node, but a contribution signed by another key.
    forged = train_reply("hospital-a", 100, poison, round_number=1, signed_as="hospital-c")
    record = new_record(honest.plan, 1)
    model = strategy.aggregate_train(1, [rogue, forged, *good], record)
    reasons = {(r.site_id, r.reason) for r in record.rejected}
    assert ("node-999", "wrong_node") in reasons
    assert ("hospital-a", "bad_contribution") in reasons
    # The real hospital-a was not crowded out as a "duplicate".
    assert record.participants == list(SITES)
    assert AggregateManifest.from_json(model.manifest).sites == SITES


def test_an_old_rounds_reply_or_an_inflated_weight_is_refused(honest: Honest) -> None:
    strategy = honest.strategy()
    old = _good_replies(honest, 1)
    record = new_record(honest.plan, 2)
    with pytest.raises(Exception, match="valid replies"):
        strategy.aggregate_train(2, old, record)  # round 1's replies replayed in round 2
    assert {r.reason for r in record.rejected} <= {"bad_contribution", "header_mismatch"}
    assert len(record.rejected) == 3

    replies = _good_replies(honest, 1)
    codec, info = honest.codec(), strategy.round_info(1)
    blobs = codec.encode(
        np.zeros(honest.plan.num_params), weight=100.0, info=info, site_id="hospital-c"
    ).to_bytes_list()
    huge = honest.plan.contract.member("hospital-c").max_examples + 1  # type: ignore[union-attr]
    inflated = train_reply("hospital-c", 102, blobs, huge, round_number=1)
    # The weight sent differs from the one signed: a node cannot re-weigh a site's reply.
    reweighed = train_reply("hospital-c", 102, blobs, 100, round_number=1, weight=5000)
    for reply, reason in ((inflated, "bad_weight"), (reweighed, "bad_contribution")):
        record = new_record(honest.plan, 1)
        with pytest.raises(Exception, match="valid replies"):
            strategy.aggregate_train(1, [reply, *replies[:2]], record)
        assert [(r.site_id, r.reason) for r in record.rejected] == [("hospital-c", reason)]
