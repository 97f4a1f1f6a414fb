"""Every shipped consortium rule: one case that allows and one that denies (table-driven).

A denying case breaks exactly one rule, and the test asserts that this rule is the *only*
reason, so the rules do not overlap and each is tested on its own. Reason sentences are
checked for the numbers and fields they must mention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from concord_protocol.policy.decisions import (
    check_read_report,
    check_release,
    check_round,
    check_submission,
)
from concord_protocol.policy.engine import PolicyEngine
from concord_protocol.policy.facts import owner_principal
from concord_protocol.principals import Principal, Role

from .conftest import ALICE, FACTS, contract, dataset, datasets, plenty


@dataclass
class Case:
    """A submission: contract changes, dataset changes, principal, remaining budgets."""

    name: str
    contract: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    principal: Principal = ALICE
    remaining: dict[str, float] | None = None
    third_site: str = "site-c"
    rule: str | None = None  # None: allowed
    mentions: tuple[str, ...] = ()


SUBMISSION_CASES = [
    # purpose
    Case("purpose allowed", {"purpose": "public_health"}),
    Case(
        "purpose not allowed by one dataset",
        {"purpose": "public_health"},
        datasets={"d_b": {"allowed_purposes": ["diagnostic_research"]}},
        rule="purpose.allowed-by-dataset",
        mentions=("public_health", "d-b", "diagnostic_research"),
    ),
    # epsilon per study (rounding is conservative: 2.00001 becomes 2.0001 > 2.0)
    Case("epsilon at the per-study maximum", {"privacy.epsilon": 2.0}),
    Case(
        "epsilon just above the per-study maximum",
        {"privacy.epsilon": 2.00001},
        rule="privacy.epsilon-per-study",
        mentions=("2.0001", "2.0", "d-a"),
    ),
    # lifetime budget left
    Case("epsilon equal to the remaining budget", remaining={"d-a": 2.0, "d-b": 9, "d-c": 9}),
    Case(
        "epsilon above the remaining budget",
        remaining={"d-a": 1.5, "d-b": 9, "d-c": 9},
        rule="privacy.budget-remaining",
        mentions=("2.0", "1.5", "d-a"),
    ),
    # sites
    Case("three distinct sites", third_site="site-c"),
    Case(
        "two distinct sites",
        third_site="site-a",
        rule="sites.minimum-distinct",
        mentions=("2 distinct site",),
    ),
    Case("min_sites 3", {"federation.min_sites": 3}),
    Case(
        "min_sites 2",
        {"federation.min_sites": 2},
        rule="sites.minimum-aggregation",
        mentions=("min_sites is 2",),
    ),
    # ethics
    Case("ethics reference of another committee", {"ethics_reference": "ETHK-2025-17"}),
    Case(
        "ethics reference missing",
        {"!ethics_reference": ""},
        rule="ethics.reference-present",
        mentions=("ethics",),
    ),
    Case(
        "ethics reference malformed",
        {"ethics_reference": "irb 2026/14"},
        rule="ethics.reference-well-formed",
        mentions=("irb 2026/14", "IRB-2026-0142"),
    ),
    # encryption
    Case(
        "no encryption where no dataset requires it",
        {"encryption.enabled": False},
        datasets={k: {"requires_encryption": False} for k in ("d_a", "d_b", "d_c")},
    ),
    Case(
        "no encryption where a dataset requires it",
        {"encryption.enabled": False},
        datasets={k: {"requires_encryption": False} for k in ("d_a", "d_c")},
        rule="encryption.required-by-dataset",
        mentions=("d-b", "encrypt"),
    ),
    # models
    Case("another catalogue model", {"model": {"name": "unet-small", "version": "2.0"}}),
    Case(
        "model not in the catalogue",
        {"model": {"name": "unet-small", "version": "3"}},
        rule="models.from-catalogue",
        mentions=("unet-small@3",),
    ),
    # membership
    Case(
        "researcher of a member hospital",
        principal=Principal("carol", frozenset({Role.RESEARCHER}), "hospital-d", "t"),
    ),
    Case(
        "researcher of a non-member organisation",
        principal=Principal("mallory", frozenset({Role.RESEARCHER}), "broker-inc", "t"),
        rule="membership.consortium-member",
        mentions=("mallory", "broker-inc"),
    ),
    Case(
        "researcher without an organisation",
        principal=Principal("nobody", frozenset({Role.RESEARCHER}), None, "t"),
        rule="membership.consortium-member",
        mentions=("nobody", "none"),
    ),
    # the permit itself (deny by default)
    Case(
        "a member without the researcher role",
        principal=Principal("steve", frozenset({Role.DATA_STEWARD}), "hospital-a", "t"),
        rule="default.deny",
        mentions=("steve", "submit a study", "d-a"),
    ),
]


@pytest.mark.parametrize("case", SUBMISSION_CASES, ids=lambda c: c.name)
def test_submission_rule(engine: PolicyEngine, case: Case) -> None:
    rows = datasets(**case.datasets)
    rows[2] = dataclasses.replace(rows[2], site_id=case.third_site)
    decision = check_submission(
        engine,
        contract(**case.contract),
        rows,
        case.principal,
        FACTS,
        remaining_epsilon=case.remaining if case.remaining is not None else plenty(rows),
    )
    assert decision.policy_set_hash == engine.policy_set_hash
    if case.rule is None:
        assert decision.allowed, decision.reason_texts()
        assert decision.policy_ids() == ["permit.submit-by-researchers"]
        return
    assert decision.denied
    assert decision.policy_ids() == [case.rule]
    text = " ".join(decision.reason_texts())
    for fragment in case.mentions:
        assert fragment in text, (fragment, text)
    assert "{" not in text  # every placeholder was filled in


def test_every_shipped_rule_has_a_denying_case(engine: PolicyEngine) -> None:
    """Guard: adding a forbid rule without a test here fails."""
    tested = {c.rule for c in SUBMISSION_CASES} | set(ROUND_RULES) | set(RELEASE_RULES)
    forbids = {pid for pid, info in engine.policies.items() if info.effect == "forbid"}
    assert forbids <= tested, forbids - tested


def test_submission_reports_every_reason_of_every_dataset(engine: PolicyEngine) -> None:
    rows = datasets(d_b={"allowed_purposes": ["diagnostic_research"]})
    decision = check_submission(
        engine,
        contract(
            **{
                "purpose": "public_health",
                "privacy.epsilon": 2.5,
                "model.version": "7",
                "datasets": ["d-a", "d-b", "d-c", "d-x"],
            }
        ),
        rows,
        ALICE,
        FACTS,
        remaining_epsilon=plenty(rows),
    )
    assert decision.denied
    assert set(decision.policy_ids()) == {
        "catalogue.dataset-known",
        "purpose.allowed-by-dataset",
        "privacy.epsilon-per-study",
        "models.from-catalogue",
    }
    epsilon_reasons = [r for r in decision.reasons if r.policy_id == "privacy.epsilon-per-study"]
    assert {r.resource for r in epsilon_reasons} == {"dataset d-a", "dataset d-b", "dataset d-c"}
    # A study-wide reason is reported once, not once per dataset.
    assert [r.policy_id for r in decision.reasons].count("models.from-catalogue") == 1
    assert "Dataset d-x is not in the consortium catalogue." in decision.reason_texts()


def test_dataset_budget_missing_from_the_ledger_view_denies(engine: PolicyEngine) -> None:
    """Forgetting to pass a dataset's remaining budget counts as none left, not as plenty."""
    rows = datasets()
    decision = check_submission(
        engine, contract(), rows, ALICE, FACTS, remaining_epsilon={"d-a": 9, "d-b": 9}
    )
    assert decision.denied
    assert decision.policy_ids() == ["privacy.budget-remaining"]
    assert "d-c" in decision.reason_texts()[0]


# --------------------------------------------------------------------------- rounds

OWNER = owner_principal("alice", "university-a")

ROUND_RULES: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    # rule: (allowing arguments, denying arguments, mentions)
    "sites.round-participants": (
        {"participating_sites": 3},
        {"participating_sites": 2},
        ("Round 4", "2 participating"),
    ),
    "privacy.round-reservation-left": (
        {"reservation_remaining": {"d-a": 0.0001, "d-b": 1, "d-c": 1}},
        {"reservation_remaining": {"d-a": 0, "d-b": 1, "d-c": 1}},
        ("Round 4", "d-a", "0.0"),
    ),
}


@pytest.mark.parametrize("rule", sorted(ROUND_RULES))
@pytest.mark.parametrize("outcome", ["allow", "deny"])
def test_round_rule(engine: PolicyEngine, rule: str, outcome: str) -> None:
    allowing, denying, mentions = ROUND_RULES[rule]
    arguments: dict[str, Any] = {
        "participating_sites": 3,
        "reservation_remaining": {"d-a": 1, "d-b": 1, "d-c": 1},
        **(allowing if outcome == "allow" else denying),
    }
    decision = check_round(
        engine,
        contract(),
        datasets(),
        OWNER,
        FACTS,
        study_id="study-1",
        round_number=4,
        **arguments,
    )
    if outcome == "allow":
        assert decision.allowed, decision.reason_texts()
        return
    assert decision.policy_ids() == [rule]
    for fragment in mentions:
        assert fragment in " ".join(decision.reason_texts())


def test_round_participants_must_also_meet_the_study_min_sites(engine: PolicyEngine) -> None:
    decision = check_round(
        engine,
        contract(**{"federation.min_sites": 4}),
        [*datasets(), dataset("d-d", "site-d")],
        OWNER,
        FACTS,
        study_id="study-1",
        round_number=1,
        participating_sites=3,
        reservation_remaining={"d-a": 1, "d-b": 1, "d-c": 1, "d-d": 1},
    )
    assert decision.denied
    assert decision.policy_ids() == ["sites.round-participants"]


def test_round_rechecks_the_contract_rules(engine: PolicyEngine) -> None:
    """The consortium may have tightened a rule since approval: rounds re-check it."""
    rows = datasets(d_c={"max_epsilon_per_study": 1.0})
    decision = check_round(
        engine,
        contract(),
        rows,
        OWNER,
        FACTS,
        study_id="study-1",
        round_number=2,
        participating_sites=3,
        reservation_remaining={"d-a": 1, "d-b": 1, "d-c": 1},
    )
    assert decision.policy_ids() == ["privacy.epsilon-per-study"]


# --------------------------------------------------------------------------- release

ADMIN = Principal("root", frozenset({Role.CONSORTIUM_ADMIN}), "university-a", "t")
OTHER = Principal("bob", frozenset({Role.RESEARCHER}), "university-a", "t")

RELEASE_RULES: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    "release.study-completed": (
        {"state": "completed"},
        {"state": "running"},
        ("study-9", "running"),
    ),
    "release.all-sites-signed-off": (
        {"sites_signed_off": 3},
        {"sites_signed_off": 2},
        ("2 of 3", "study-9"),
    ),
}


@pytest.mark.parametrize("rule", sorted(RELEASE_RULES))
@pytest.mark.parametrize("outcome", ["allow", "deny"])
def test_release_rule(engine: PolicyEngine, rule: str, outcome: str) -> None:
    allowing, denying, mentions = RELEASE_RULES[rule]
    arguments: dict[str, Any] = {
        "state": "completed",
        "sites_signed_off": 3,
        **(allowing if outcome == "allow" else denying),
    }
    decision = check_release(
        engine, contract(), datasets(), OWNER, OWNER, FACTS, study_id="study-9", **arguments
    )
    if outcome == "allow":
        assert decision.allowed, decision.reason_texts()
        assert decision.policy_ids() == ["release.by-owner-or-admin"]
        return
    assert decision.policy_ids() == [rule]
    for fragment in mentions:
        assert fragment in decision.reason_texts()[0]


@pytest.mark.parametrize(
    ("requester", "allowed"),
    [(OWNER, True), (ADMIN, True), (OTHER, False)],
    ids=["owner", "admin", "other researcher"],
)
def test_release_permit(engine: PolicyEngine, requester: Principal, allowed: bool) -> None:
    decision = check_release(
        engine,
        contract(),
        datasets(),
        OWNER,
        requester,
        FACTS,
        study_id="study-9",
        state="completed",
        sites_signed_off=3,
    )
    assert decision.allowed is allowed
    if not allowed:
        assert decision.policy_ids() == ["default.deny"]
        assert "researcher bob" in decision.reason_texts()[0]


@pytest.mark.parametrize(
    ("reader", "allowed"),
    [
        (OWNER, True),
        (OTHER, False),
        (Principal("cleo", frozenset({Role.COMPLIANCE_OFFICER}), None, "t"), True),
        (Principal("sam", frozenset({Role.DATA_STEWARD}), "hospital-b", "t"), True),
        (Principal("dan", frozenset({Role.DATA_STEWARD}), "hospital-d", "t"), False),
    ],
    ids=["owner", "other researcher", "compliance", "steward of a site", "other steward"],
)
def test_read_report(engine: PolicyEngine, reader: Principal, allowed: bool) -> None:
    decision = check_read_report(
        engine, contract(), datasets(), OWNER, reader, FACTS, study_id="s", state="completed"
    )
    assert decision.allowed is allowed
