"""The comparison ClientApp's switch: SecAgg+ only when the run config asks for it.

Concord's own path (CKKS, or PlainCodec with encryption off) must behave exactly as in
Concord's ClientApp: the comparison ClientApp's train handler hands the very same message
and context to Concord's ``_train`` and returns its reply untouched, whatever else the run
config holds, unless ``aggregation`` is ``secagg+``. Concord's ClientApp itself has no such
switch any more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from benchmarks.apps import compare_client
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.strategy import BlindAggregationStrategy
from site_node.crypto import EncodedUpdate
from site_node.federation import clientapp
from site_node.training import build_model, num_parameters
from tests.support.flower import approve_everywhere, breast_cancer_contract, make_site
from tests.support.inprocess_grid import flower_task_identity


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    with flower_task_identity():
        yield


def _context(tmp_path: Path, *, encryption: bool = True) -> tuple[RunPlan, Context]:
    contract = breast_cancer_contract(rounds=1, encryption=encryption)
    sites = [make_site(tmp_path, i) for i in range(3)]
    public = approve_everywhere(sites, "study-1", contract)
    plan = RunPlan(
        study_id="study-1",
        contract=contract,
        contract_hash=contract.contract_hash(),
        num_params=num_parameters(build_model(contract.model, input_shape=(30,), num_classes=2)),
        sites=tuple(s.site_id for s in sites),
        public_context=public,
    )
    context = Context(
        run_id=1,
        node_id=100,
        node_config={
            "site-id": sites[0].site_id,
            "state-dir": str(sites[0].state_dir),
            "datasets-file": str(sites[0].datasets_file),
        },
        state=RecordDict(),
        run_config=plan.to_run_config(),
    )
    return plan, context


def _train_message(plan: RunPlan) -> Message:
    return Message(
        BlindAggregationStrategy(plan).content(1, None),
        dst_node_id=100,
        message_type="train",
        group_id="1",
    )


@pytest.mark.parametrize("extra", [{}, {"aggregation": "ckks"}, {"aggregation": "fedavg"}])
def test_train_without_secaggplus_is_the_default_handler_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]
) -> None:
    plan, context = _context(tmp_path)
    context.run_config = {**context.run_config, **extra}
    msg = _train_message(plan)
    sentinel = Message(RecordDict(), reply_to=msg)
    calls: list[tuple[Message, Context]] = []

    def default(m: Message, c: Context) -> Message:
        calls.append((m, c))
        return sentinel

    def never(m: Message, c: Context) -> Message:
        raise AssertionError("SecAgg+ path taken")

    monkeypatch.setattr(clientapp, "_train", default)
    monkeypatch.setattr(compare_client, "secaggplus_train", never)

    assert compare_client.app(msg, context) is sentinel
    ((got_msg, got_context),) = calls
    assert got_msg is msg
    assert got_context is context


def test_concords_clientapp_ignores_the_comparison_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concord's own ClientApp has no SecAgg+ branch: ``aggregation=secagg+`` (which no
    Concord bundle can carry anyway) still gets Concord's train handler."""
    plan, context = _context(tmp_path, encryption=False)
    context.run_config = {**context.run_config, "aggregation": "secagg+"}
    msg = _train_message(plan)
    sentinel = Message(RecordDict(), reply_to=msg)
    monkeypatch.setattr(clientapp, "_train", lambda m, c: sentinel)
    monkeypatch.setattr(compare_client, "secaggplus_train", pytest.fail)

    assert clientapp.app(msg, context) is sentinel
    assert not hasattr(clientapp, "AGGREGATION_KEY")
    assert not hasattr(clientapp, "SECAGGPLUS")


def test_default_train_reply_is_concords_encrypted_update(tmp_path: Path) -> None:
    """The real handler, no patching: Concord's run config gives Concord's reply."""
    plan, context = _context(tmp_path)
    msg = _train_message(plan)

    reply = compare_client.app(msg, context)

    assert not reply.has_error()
    assert set(reply.content.keys()) == {"update", "metrics", "site"}
    update = EncodedUpdate.from_bytes_list(
        [bytes(a.data) for a in reply.content.array_records["update"].values()]
    )
    assert update.header.scheme == "ckks"
    assert update.header.round_number == 1
    assert update.header.num_params == plan.num_params
    assert set(reply.content.metric_records["metrics"].keys()) == {
        "num-examples",
        "epsilon",
        "noise-multiplier",
        "sample-rate",
        "steps-total",
        "evaluations",
        "evaluation-noise",
        "train-seconds",
        "encrypt-seconds",
    }
    site = reply.content.config_records["site"]
    assert {"contribution", "spend-report"} <= set(site.keys())
    assert RECORD_KEY_STATE not in context.state.config_records


def test_the_comparison_clientapp_keeps_the_sites_contract_guard(tmp_path: Path) -> None:
    """Like Concord's, the comparison ClientApp refuses runs of contracts the site did not
    approve, before any handler (SecAgg+ included) runs."""
    plan, context = _context(tmp_path, encryption=False)
    other = breast_cancer_contract(rounds=1, encryption=False, title="Not approved here")
    context.run_config = {
        **context.run_config,
        "contract": other.canonical().decode(),
        "contract-hash": other.contract_hash(),
        "aggregation": "secagg+",
    }

    reply = compare_client.app(_train_message(plan), context)

    assert reply.has_error()
    assert "contract.not_approved" in (reply.error.reason or "")


def test_secaggplus_switch_goes_through_flowers_mod(tmp_path: Path) -> None:
    """``aggregation=secagg+`` on an unencrypted contract: the setup stage answers with the
    site's SecAgg+ public keys, and the mod keeps its state in the context."""
    _, context = _context(tmp_path, encryption=False)
    context.run_config = {**context.run_config, "aggregation": "secagg+"}
    setup = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 3,
            Key.SHARE_NUMBER: 3,
            Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: 8.0,
            Key.TARGET_RANGE: 2**22,
            Key.MOD_RANGE: 2**32,
            Key.MAX_WEIGHT: 1000.0,
        }
    )
    msg = Message(
        RecordDict({RECORD_KEY_CONFIGS: setup}),
        dst_node_id=100,
        message_type="train",
        group_id="1",
    )

    reply = compare_client.app(msg, context)

    assert not reply.has_error()
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert set(keys.keys()) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    assert RECORD_KEY_STATE in context.state.config_records
