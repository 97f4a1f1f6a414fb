"""The run config's keys are one list: the bundle declares them, the server sets them."""

from __future__ import annotations

import tomllib

import pytest

from concord_protocol.bundle import APP_DIR
from concord_protocol.wire.messages import RUN_CONFIG_KEYS, arrays_to_blobs, blobs_to_arrays
from consortium_server.federation.plan import RunPlan
from tests.support.flower import breast_cancer_contract


def test_the_bundle_declares_every_key_the_plan_sets() -> None:
    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"
    ]
    contract = breast_cancer_contract(encryption=False)
    plan = RunPlan("s", contract, contract.contract_hash(), 10, ("a", "b", "c"))
    # Flower refuses a run config key the bundle does not declare.
    assert set(plan.to_run_config()) == set(declared) == set(RUN_CONFIG_KEYS)
    assert RunPlan.from_run_config(plan.to_run_config()) == plan


def test_blobs_round_trip_and_other_layouts_are_refused() -> None:
    blobs = [b"header", b"", b"\x00" * 7]
    assert arrays_to_blobs(blobs_to_arrays(blobs)) == blobs
    record = blobs_to_arrays(blobs)
    record["0009"] = record["0000"]
    with pytest.raises(ValueError, match=r"0000\.\.n"):
        arrays_to_blobs(record)
