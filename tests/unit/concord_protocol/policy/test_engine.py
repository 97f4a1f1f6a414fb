"""PolicyEngine: strict loading, deny by default, errors deny, readable reasons, hashing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from concord_protocol.errors import PolicyLoadError
from concord_protocol.policy.decisions import check_site_approval, check_submission
from concord_protocol.policy.engine import Decision, PolicyEngine, policy_set_hash
from concord_protocol.policy.facts import build_study_facts, owner_principal

from .conftest import ALICE, FACTS, POLICIES, SCHEMA, contract, datasets, plenty

SCHEMA_TEXT = SCHEMA.read_text()

PERMIT_REPORTS = """
@id("reports.owner")
permit (principal, action == Concord::Action::"ReadReport", resource)
when { principal == resource.owner };
"""


def _load(texts: dict[str, str]) -> PolicyEngine:
    return PolicyEngine.load(texts, SCHEMA_TEXT)


# --------------------------------------------------------------------------- loading


def test_shipped_policies_and_site_templates_validate() -> None:
    consortium = PolicyEngine.load(POLICIES / "consortium", SCHEMA)
    assert len(consortium.policies) >= 15
    assert all(info.policy_id and info.file for info in consortium.policies.values())
    sites = PolicyEngine.load(POLICIES / "sites", SCHEMA, label="site:x")
    assert "site.permit-consortium-approved" in sites.policies


def test_syntax_error_names_file_and_line() -> None:
    broken = (
        PERMIT_REPORTS + '\n\n@id("bad")\nforbid (principal, action, resource)\nwhen { 1 + };\n'
    )
    with pytest.raises(PolicyLoadError) as caught:
        _load({"good.cedar": PERMIT_REPORTS, "broken.cedar": broken})
    error = caught.value
    assert error.file == "broken.cedar"
    assert error.line == 7  # the line of the broken policy's first token (its @id)
    assert error.code == "policy.invalid"
    assert str(error).startswith("broken.cedar, line 7: does not parse: ")
    assert "unexpected token" in str(error)


def test_schema_violation_names_file_line_and_validator_message() -> None:
    text = (
        PERMIT_REPORTS + '\n@id("typo")\n@reason("r")\n'
        'forbid (principal, action == Concord::Action::"SubmitStudy", resource)\n'
        'when { context.study.epsilonn.greaterThan(decimal("1.0")) };\n'
    )
    with pytest.raises(PolicyLoadError) as caught:
        _load({"privacy.cedar": text})
    error = caught.value
    assert error.file == "privacy.cedar"
    assert error.line == 6
    assert "does not validate against the schema" in str(error)
    assert "epsilonn" in str(error)
    assert error.details[0]["policy_id"] == "typo"


def test_schema_type_error_is_refused() -> None:
    """Comparing a decimal with < is a type error the validator catches at load."""
    text = (
        '@id("t")\n@reason("r")\nforbid (principal, action == Concord::Action::"SubmitStudy",'
        " resource) when { context.study.epsilon < 2 };\n"
    )
    with pytest.raises(PolicyLoadError, match=r"t\.cedar, line 1: does not validate"):
        _load({"t.cedar": text})


@pytest.mark.parametrize(
    ("texts", "fragment"),
    [
        ({"a.cedar": "permit (principal, action, resource);"}, "needs an @id"),
        (
            {"a.cedar": '@id("x") forbid (principal, action, resource);'},
            'forbid policy "x" needs a @reason',
        ),
        (
            {"a.cedar": PERMIT_REPORTS, "b.cedar": PERMIT_REPORTS},
            '@id("reports.owner") is already used in a.cedar',
        ),
        ({"a.cedar": "// nothing here\n"}, "the policy set is empty"),
        (
            {"a.cedar": '@id("t") permit (principal == ?principal, action, resource);'},
            "templates",
        ),
        ({"a.txt": PERMIT_REPORTS}, "end in .cedar"),
    ],
    ids=["no id", "forbid without reason", "duplicate id", "empty", "template", "name"],
)
def test_load_refuses(texts: dict[str, str], fragment: str) -> None:
    with pytest.raises(PolicyLoadError) as caught:
        _load(texts)
    assert fragment in str(caught.value)


def test_invalid_schema_is_named() -> None:
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load(
            {"a.cedar": PERMIT_REPORTS}, "namespace Concord { entity A = { x: Strin }; }"
        )
    assert caught.value.file == "schema.cedarschema"
    assert "Strin" in str(caught.value)


def test_directory_load_names_the_file_path(tmp_path: Path) -> None:
    directory = tmp_path / "consortium"
    shutil.copytree(POLICIES / "consortium", directory)
    (directory / "models.cedar").write_text(
        (directory / "models.cedar").read_text().replace("model_catalogue", "model_catalog")
    )
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load(directory, SCHEMA)
    assert caught.value.file == str(directory / "models.cedar")
    assert str(caught.value).startswith(f"{directory / 'models.cedar'}, line ")
    assert "model_catalog" in str(caught.value)


# --------------------------------------------------------------------------- evaluation


def test_deny_by_default_when_no_policy_permits() -> None:
    engine = _load({"reports.cedar": PERMIT_REPORTS})
    rows = datasets()
    decision = check_submission(
        engine, contract(), rows, ALICE, FACTS, remaining_epsilon=plenty(rows)
    )
    assert decision.denied
    assert decision.policy_ids() == ["default.deny"]
    assert decision.reason_texts()[0] == (
        "No consortium policy permits researcher alice to submit a study using dataset d-a."
    )


def test_a_missing_attribute_denies_instead_of_allowing(engine: PolicyEngine) -> None:
    rows = datasets()
    facts = build_study_facts(contract(), rows, ALICE, FACTS, remaining_epsilon=plenty(rows))
    for entity in facts.entities:
        if entity["uid"]["id"] == "d-a":
            entity["attrs"]["max_epsilon_per_study"] = {
                "__extn": {"fn": "decimal", "arg": "1.0000"}
            }
            del entity["attrs"]["remaining_epsilon"]
    decision = engine.evaluate(
        "SubmitStudy", facts.owner, facts.datasets["d-a"], facts.study_context(), facts.entities
    )
    assert decision.denied
    assert decision.policy_ids() == ["evaluation.error"]
    assert "remaining_epsilon" in decision.errors[0]
    assert decision.reason_texts()[0].startswith("The consortium policy could not be evaluated")
    # Why the schema is always passed: without it Cedar skips the erroring forbid and the
    # over-budget study (epsilon 2.0 > cap 1.0) would be allowed.
    texts = "\n".join(engine.texts.values())
    request = {
        "principal": facts.owner,
        "action": {"type": "Concord::Action", "id": "SubmitStudy"},
        "resource": facts.datasets["d-a"],
        "context": facts.study_context(),
    }
    assert cedarpy.is_authorized(request, texts, json.dumps(facts.entities)).allowed


def test_a_missing_context_attribute_denies(engine: PolicyEngine) -> None:
    rows = datasets()
    facts = build_study_facts(contract(), rows, ALICE, FACTS, remaining_epsilon=plenty(rows))
    context = facts.study_context()
    del context["model_catalogue"]
    decision = engine.evaluate(
        "SubmitStudy", facts.owner, facts.datasets["d-a"], context, facts.entities
    )
    assert decision.denied
    assert "model_catalogue" in decision.errors[0]


def test_decision_record_carries_hash_and_reasons_by_id(engine: PolicyEngine) -> None:
    rows = datasets()
    decision = check_submission(
        engine,
        contract(**{"privacy.epsilon": 3}),
        rows,
        ALICE,
        FACTS,
        remaining_epsilon=plenty(rows),
    )
    record = decision.as_record()
    assert record["decision"] == "deny"
    assert record["policy_set_hash"] == engine.policy_set_hash
    assert {r["policy_id"] for r in record["reasons"]} == {"privacy.epsilon-per-study"}
    assert record["reasons"][0]["text"] == (
        "The study's epsilon 3.0 exceeds the per-study maximum 2.0 of dataset d-a."
    )


# --------------------------------------------------------------------------- hashing


def test_policy_set_hash_changes_with_any_change() -> None:
    base = {"a.cedar": PERMIT_REPORTS, "b.cedar": PERMIT_REPORTS.replace("reports.owner", "b")}
    reference = policy_set_hash(base, SCHEMA_TEXT)
    assert policy_set_hash(dict(reversed(base.items())), SCHEMA_TEXT) == reference
    assert _load(base).policy_set_hash == reference
    variants = [
        ({**base, "a.cedar": base["a.cedar"] + " "}, SCHEMA_TEXT),  # whitespace
        ({"c.cedar": base["a.cedar"], "b.cedar": base["b.cedar"]}, SCHEMA_TEXT),  # rename
        ({"a.cedar": base["a.cedar"]}, SCHEMA_TEXT),  # removal
        (base, SCHEMA_TEXT + "\n"),  # schema
    ]
    hashes = {policy_set_hash(texts, schema) for texts, schema in variants}
    assert reference not in hashes
    assert len(hashes) == len(variants)


# --------------------------------------------------------------------------- site policies


PERMIT_EVERYTHING = '@id("site.everything")\npermit (principal, action, resource);\n'


def _approve(consortium: PolicyEngine, site: PolicyEngine, **changes: Any) -> Decision:
    rows = datasets()
    return check_site_approval(
        consortium,
        site,
        contract(**changes),
        rows,
        owner_principal("alice", "university-a"),
        FACTS,
        site_id="site-a",
        remaining_epsilon=plenty(rows),
        study_id="study-1",
    )


def test_site_approval_allowed_when_both_allow(
    engine: PolicyEngine, load_site: Callable[..., PolicyEngine]
) -> None:
    site = load_site("00-base.cedar", "epsilon-cap.cedar")
    decision = _approve(engine, site)
    assert decision.allowed
    assert decision.policy_set_hash == engine.policy_set_hash
    assert decision.site_policy_set_hash == site.policy_set_hash


def test_a_permissive_site_policy_does_not_loosen(
    engine: PolicyEngine, load_site: Callable[..., PolicyEngine]
) -> None:
    site = load_site(extra={"everything.cedar": PERMIT_EVERYTHING})
    decision = _approve(engine, site, **{"privacy.epsilon": 5.0, "purpose": "commercial_research"})
    assert decision.denied
    assert set(decision.policy_ids()) == {
        "privacy.epsilon-per-study",
        "purpose.allowed-by-dataset",
    }
    assert {r.source for r in decision.reasons} == {"consortium"}


def test_a_site_policy_tightens(
    engine: PolicyEngine, load_site: Callable[..., PolicyEngine]
) -> None:
    site = load_site("00-base.cedar", "purposes-subset.cedar", "organisations-allowlist.cedar")
    decision = _approve(engine, site, purpose="method_development")
    assert decision.denied
    assert decision.policy_ids() == [
        "site.organisations-allowlist",
        "site.purposes-subset",
    ]
    assert {r.source for r in decision.reasons} == {"site:site-a"}
    text = " ".join(decision.reason_texts())
    assert "method_development" in text
    assert "alice belongs to university-a" in text


def test_site_epsilon_cap_template(
    engine: PolicyEngine, load_site: Callable[..., PolicyEngine]
) -> None:
    site = load_site("00-base.cedar", "epsilon-cap.cedar")
    rows = datasets(d_a={"max_epsilon_per_study": 4.0})
    decision = check_site_approval(
        engine,
        site,
        contract(**{"privacy.epsilon": 2.5}),
        rows,
        owner_principal("alice", "university-a"),
        FACTS,
        site_id="site-a",
        remaining_epsilon=plenty(rows),
    )
    assert decision.policy_ids() == ["site.epsilon-cap"]
    assert "2.5" in decision.reason_texts()[0]


def test_a_site_set_without_a_permit_denies(
    engine: PolicyEngine, load_site: Callable[..., PolicyEngine]
) -> None:
    decision = _approve(engine, load_site("epsilon-cap.cedar"))
    assert decision.denied
    assert decision.policy_ids() == ["default.deny"]
    assert "No site:site-a policy permits" in decision.reason_texts()[0]


def test_site_without_datasets_in_the_study(
    engine: PolicyEngine, load_site: Callable[..., PolicyEngine]
) -> None:
    rows = datasets()
    decision = check_site_approval(
        engine,
        load_site("00-base.cedar"),
        contract(),
        rows,
        ALICE,
        FACTS,
        site_id="site-d",
        remaining_epsilon=plenty(rows),
    )
    assert decision.policy_ids() == ["site.has-datasets"]
