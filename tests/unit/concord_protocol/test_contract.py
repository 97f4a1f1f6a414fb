"""The study contract: validation and the hash sites approve."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from concord_protocol.contract import StudyContract, StudyDraft, ethics_reference_well_formed
from tests.support.roster import contract_of, roster
from tests.support.world import study_contract


def test_hash_ignores_key_order_and_includes_defaults() -> None:
    raw = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
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
        {"encryption": {"scheme": "ckks_seeded"}},
        {"key_generator": "hospital-b"},
        {"roster": [m.model_dump(mode="json") for m in roster(["hospital-a", "hospital-b"])]},
    ],
)
def test_any_change_changes_the_hash(change: dict[str, object]) -> None:
    base = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    changed = StudyContract.model_validate({**base, **change})
    assert StudyContract.model_validate(base).contract_hash() != changed.contract_hash()


def test_the_encryption_scheme_defaults_to_ckks_and_names_only_known_schemes() -> None:
    raw = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    assert raw["encryption"] == {"enabled": True, "scheme": "ckks"}  # unchanged: old hashes hold
    seeded = StudyContract.model_validate({**raw, "encryption": {"scheme": "ckks_seeded"}})
    assert seeded.encryption.scheme == "ckks_seeded"
    assert b'"scheme":"ckks_seeded"' in seeded.canonical()
    for scheme in ("plain", "bfv", "CKKS"):
        with pytest.raises(ValidationError):
            StudyContract.model_validate({**raw, "encryption": {"scheme": scheme}})


def test_a_swapped_key_fingerprint_changes_the_hash() -> None:
    base = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    base["roster"][1]["key_fingerprint"] = "0" * 64
    assert (
        StudyContract.model_validate(base).contract_hash()
        != contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).contract_hash()
    )


def test_duplicate_datasets_are_named() -> None:
    with pytest.raises(ValidationError, match="bc-a"):
        StudyDraft.model_validate(study_contract(["bc-a", "bc-a"]))


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="run_this"):
        StudyDraft.model_validate({**study_contract(["bc-a"]), "run_this": "rm -rf /"})


def test_a_contract_needs_its_roster_and_key_generator() -> None:
    with pytest.raises(ValidationError, match="roster"):
        StudyContract.model_validate(study_contract(["bc-a"]))


def test_the_key_generator_must_be_in_the_roster() -> None:
    body = contract_of(study_contract(["bc-a", "bc-b"])).model_dump(mode="json")
    with pytest.raises(ValidationError, match="key_generator 'hospital-z' is not in the roster"):
        StudyContract.model_validate({**body, "key_generator": "hospital-z"})


@pytest.mark.parametrize(
    "sites",
    [["hospital-b", "hospital-a"], ["hospital-a", "hospital-a"]],
    ids=["unsorted", "repeated"],
)
def test_the_roster_is_sorted_and_unique(sites: list[str]) -> None:
    body = contract_of(study_contract(["bc-a", "bc-b"])).model_dump(mode="json")
    members = {m.site_id: m.model_dump(mode="json") for m in roster(["hospital-a", "hospital-b"])}
    body["roster"] = [members[s] for s in sites]
    with pytest.raises(ValidationError, match="sorted"):
        StudyContract.model_validate(body)


def test_a_draft_completes_into_the_contract_with_its_roster() -> None:
    draft = StudyDraft.model_validate(study_contract(["bc-a", "bc-b"]))
    contract = draft.complete(roster(["hospital-a", "hospital-b"]), "hospital-b")
    assert contract.site_ids == ("hospital-a", "hospital-b")
    assert contract.key_generator == "hospital-b"
    assert contract.member("hospital-a") is not None
    assert contract.member("hospital-c") is None
    assert contract.title == draft.title


@pytest.mark.parametrize(
    ("reference", "ok"),
    [("IRB-2026-0142", True), ("ETHK-2025-17", True), ("irb-2026-1", False), ("TBD", False)],
)
def test_ethics_reference_format(reference: str, ok: bool) -> None:
    assert ethics_reference_well_formed(reference) is ok


def test_the_contract_names_what_sites_release_without_dp_inside_its_hash() -> None:
    """Every steward approves the list of public fields with the contract's hash; a draft
    cannot narrow or widen it (the sites release exactly those fields)."""
    from concord_protocol.disclosure import public

    draft = StudyDraft.model_validate(study_contract(["bc-a"]))
    assert draft.public_fields == public()
    assert "record count" in draft.public_fields
    contract = contract_of(study_contract(["bc-a"]))
    assert contract.model_dump(mode="json")["public_fields"] == public()
    with pytest.raises(ValidationError, match="public_fields must be exactly"):
        StudyDraft.model_validate({**study_contract(["bc-a"]), "public_fields": ["timings"]})


#: The hash of the fixture contract before studies named a task (Concord d307a4f).
_HASH_BEFORE_TASKS = "5127992c0fe5cc999698922cda60218ec58ade96524c7fd3d8b3ba81f09d35cf"


def test_a_classification_contract_keeps_the_hash_it_had_before_tasks() -> None:
    contract = contract_of(study_contract(["bc-a", "bc-b", "bc-c"]))
    assert contract.task.kind == "classification"
    assert contract.task.loss == "cross_entropy"
    assert b'"task"' not in contract.canonical()
    assert contract.contract_hash() == _HASH_BEFORE_TASKS
    explicit = StudyContract.model_validate(
        {**contract.model_dump(mode="json"), "task": {"kind": "classification"}}
    )
    assert explicit.contract_hash() == _HASH_BEFORE_TASKS  # the default, written out


def test_a_segmentation_task_is_inside_the_hash_with_its_default_loss() -> None:
    raw = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    segmentation = StudyContract.model_validate({**raw, "task": {"kind": "segmentation"}})
    assert segmentation.task.loss == "dice"
    assert segmentation.task.metrics == ("dice", "hd95")
    assert b'"task":{"kind":"segmentation","loss":"dice"}' in segmentation.canonical()
    dice = StudyContract.model_validate(
        {**raw, "task": {"kind": "segmentation", "loss": "dice_ce"}}
    )
    hashes = {_HASH_BEFORE_TASKS, segmentation.contract_hash(), dice.contract_hash()}
    assert len(hashes) == 3
    assert StudyContract.model_validate(segmentation.model_dump(mode="json")) == segmentation


#: Declared preprocessing of a CT segmentation study (the example in docs/researcher.md).
_STEPS = [
    {"op": "orientation", "axcodes": "RAS"},
    {"op": "spacing", "pixdim": [1.5, 1.5, 2.0]},
    {"op": "scale_intensity_range", "a_min": -1000, "a_max": 400},
    {"op": "crop_or_pad", "spatial_size": [96, 96, 64]},
    {"op": "resize", "spatial_size": [32, 32, 32]},
]
#: Its hash, pinned: the canonical form of declared preprocessing must never drift.
_HASH_WITH_PREPROCESSING = "3d7c76b28c9b241d0bc5e658676dd6c4823360b7d8ac9bac6bb8000cd8a068c0"


def test_no_preprocessing_keeps_the_hash_and_declared_steps_are_inside_it() -> None:
    raw = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    assert "preprocessing" not in raw
    empty = StudyContract.model_validate({**raw, "preprocessing": {"steps": []}})
    assert empty.contract_hash() == _HASH_BEFORE_TASKS  # the default, written out
    assert StudyContract.model_validate({**raw, "preprocessing": {}}).preprocessing.steps == ()
    declared = StudyContract.model_validate(
        {**raw, "task": {"kind": "segmentation"}, "preprocessing": {"steps": _STEPS}}
    )
    assert declared.contract_hash() == _HASH_WITH_PREPROCESSING
    assert declared.preprocessing.output_spatial_shape() == (32, 32, 32)
    assert b'"preprocessing":{"steps":[{"axcodes":"RAS","op":"orientation"}' in (
        declared.canonical()
    )
    # Round trip (what a site recomputes from the contract it is sent), and any change moves it.
    assert StudyContract.model_validate(declared.model_dump(mode="json")) == declared
    changed = [*_STEPS[:-1], {"op": "resize", "spatial_size": [32, 32, 31]}]
    other = StudyContract.model_validate(
        {**raw, "task": {"kind": "segmentation"}, "preprocessing": {"steps": changed}}
    )
    assert other.contract_hash() != _HASH_WITH_PREPROCESSING


@pytest.mark.parametrize(
    "preprocessing",
    [
        {"steps": [{"op": "normalize_intensity"}]},
        {"steps": [{"op": "resize", "spatial_size": [0, 8, 8]}]},
        {"steps": [{"op": "scale_intensity_range", "a_min": 1, "a_max": 0}]},
        {"steps": [], "extra": True},
        [{"op": "resize", "spatial_size": [8, 8, 8]}],
    ],
    ids=["unknown-step", "out-of-range", "inverted-window", "extra-field", "bare-list"],
)
def test_a_contract_with_undeclarable_preprocessing_is_refused(preprocessing: object) -> None:
    raw = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    with pytest.raises(ValidationError, match="preprocessing"):
        StudyContract.model_validate({**raw, "preprocessing": preprocessing})


@pytest.mark.parametrize(
    "task",
    [
        {"kind": "segmentation", "loss": "cross_entropy"},
        {"kind": "classification", "loss": "dice"},
        {"kind": "detection"},
        {"kind": "segmentation", "loss": "focal"},
        {"kind": "segmentation", "extra": 1},
    ],
)
def test_a_task_with_a_loss_not_its_own_is_refused(task: dict[str, object]) -> None:
    raw = contract_of(study_contract(["bc-a", "bc-b", "bc-c"])).model_dump(mode="json")
    with pytest.raises(ValidationError):
        StudyContract.model_validate({**raw, "task": task})


@pytest.mark.parametrize("name", ["study.yaml", "segmentation-study.yaml"])
def test_the_documented_example_studies_are_valid_drafts(name: str) -> None:
    from pathlib import Path

    import yaml

    from concord_protocol.catalogue import check_task, resolve_hyperparameters

    path = Path(__file__).parents[3] / "docs" / "examples" / name
    draft = StudyDraft.model_validate(yaml.safe_load(path.read_text()))
    entry = check_task(draft.model, draft.task)
    resolve_hyperparameters(entry, draft.model.hyperparameters)
