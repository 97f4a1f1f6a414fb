"""The study contract: validation and the hash sites approve."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from concord_protocol.contract import StudyContract, ethics_reference_well_formed
from tests.support.world import study_contract


def test_hash_ignores_key_order_and_includes_defaults() -> None:
    raw = study_contract(["bc-a", "bc-b", "bc-c"])
    reordered = dict(reversed(list(raw.items())))
    a = StudyContract.model_validate(raw)
    b = StudyContract.model_validate(reordered)
    assert a.contract_hash() == b.contract_hash()
    without_defaults = {k: v for k, v in raw.items() if k not in ("federation", "encryption")}
    c = StudyContract.model_validate(without_defaults)
    assert c.federation.min_sites == 3
    assert b'"min_sites":3' in c.canonical()


@pytest.mark.parametrize(
    "change",
    [
        {"title": "Another title"},
        {"datasets": ["bc-a", "bc-c", "bc-b"]},
        {"privacy": {"epsilon": 3.0001, "delta": 1e-5}},
        {"encryption": {"enabled": False}},
    ],
)
def test_any_change_changes_the_hash(change: dict[str, object]) -> None:
    base = StudyContract.model_validate(study_contract(["bc-a", "bc-b", "bc-c"]))
    changed = StudyContract.model_validate({**study_contract(["bc-a", "bc-b", "bc-c"]), **change})
    assert base.contract_hash() != changed.contract_hash()


def test_duplicate_datasets_are_named() -> None:
    with pytest.raises(ValidationError, match="bc-a"):
        StudyContract.model_validate(study_contract(["bc-a", "bc-a"]))


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="run_this"):
        StudyContract.model_validate({**study_contract(["bc-a"]), "run_this": "rm -rf /"})


@pytest.mark.parametrize(
    ("reference", "ok"),
    [("IRB-2026-0142", True), ("ETHK-2025-17", True), ("irb-2026-1", False), ("TBD", False)],
)
def test_ethics_reference_format(reference: str, ok: bool) -> None:
    assert ethics_reference_well_formed(reference) is ok
