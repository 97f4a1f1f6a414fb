"""The site ClientApp's comparison switch: SecAgg+ only when the run config asks for it.

Concord's own path (CKKS, or PlainCodec with encryption off) must behave exactly as before:
the train handler hands the very same message and context to ``_train`` and returns its
reply untouched, whatever else the run config holds, unless ``aggregation`` is
``secagg+``.
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

from consortium_server.federation.strategy import BlindAggregationStrategy, RunPlan
from site_node.crypto import EncodedUpdate
from site_node.federation import clientapp
from site_node.federation import compare as site_compare
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


@pytest.mark.parametrize("extra", [{}, {"aggregation": "ckks"}, {"aggregation": "fedavg"}])
def test_train_without_secaggplus_is_the_default_handler_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]
) -> None:
    plan, context = _context(tmp_path)
    context.run_config = {**context.run_config, **extra}
    msg = Message(
        BlindAggregationStrategy(plan).content(1, None),
        dst_node_id=100,
        message_type="train",
        group_id="1",
    )
    sentinel = Message(RecordDict(), reply_to=msg)
    calls: list[tuple[Message, Context]] = []

    def default(m: Message, c: Context) -> Message:
        calls.append((m, c))
        return sentinel

    def never(m: Message, c: Context) -> Message:
        raise AssertionError("SecAgg+ path taken")

    monkeypatch.setattr(clientapp, "_train", default)
    monkeypatch.setattr(site_compare, "secaggplus_train", never)

    assert clientapp.app(msg, context) is sentinel
    ((got_msg, got_context),) = calls
    assert got_msg is msg
    assert got_context is context


def test_default_train_reply_is_concords_encrypted_update(tmp_path: Path) -> None:
    """The real handler, no patching: Concord's run config gives Concord's reply."""
    plan, context = _context(tmp_path)
    msg = Message(
        BlindAggregationStrategy(plan).content(1, None),
        dst_node_id=100,
        message_type="train",
        group_id="1",
    )

    reply = clientapp.app(msg, context)

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
        "train-seconds",
        "encrypt-seconds",
    }
    assert RECORD_KEY_STATE not in context.state.config_records


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

    reply = clientapp.app(msg, context)

    assert not reply.has_error()
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    assert set(keys.keys()) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}
    assert RECORD_KEY_STATE in context.state.config_records


def test_the_overflow_guard_is_sized_for_every_site_of_the_study(tmp_path: Path) -> None:
    """Each site's values are bounded so that the sum of all the study's sites cannot leave
    CKKS' range: at least the default 32, more for a larger study."""
    from site_node.crypto import CkksCodec

    _, context = _context(tmp_path)
    small = clientapp.SiteRuntime.from_context(context)
    assert isinstance(small.codec, CkksCodec)
    limit_32 = small.codec.per_site_limit
    many = ",".join(f"site-{i:03d}" for i in range(100))
    context.run_config["sites"] = many
    large = clientapp.SiteRuntime.from_context(context)
    assert isinstance(large.codec, CkksCodec)
    assert large.codec.per_site_limit * 100 == pytest.approx(limit_32 * 32)
