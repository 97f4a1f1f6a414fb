"""The four decision points of a study's life, on top of :class:`PolicyEngine`.

* :func:`check_submission`: when a researcher submits; every dataset is evaluated and
  every reason of every dataset is returned, so a rejected study says all that is wrong.
* :func:`check_site_approval`: when a site's data steward approves; the consortium policy
  (re-evaluated: it may have changed since submission) **and** the site's own policy must
  both allow. The site set is evaluated in addition, never instead, so a site policy can
  only tighten: even a site policy that permits everything cannot turn a consortium deny
  into an allow.
* :func:`check_round`: before every round, per dataset (and per site, site side).
* :func:`check_release`: the release gate.

Each returns a :class:`~concord_protocol.policy.engine.Decision` carrying the policy-set
hash(es) and the reasons by policy id; :meth:`Decision.as_record` is what the audit log
stores. None of these functions raises on a deny: the caller decides (typically
``PolicyDeniedError(message, details=[r.as_dict() for r in decision.reasons])``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from concord_protocol.contract import StudyContract
from concord_protocol.policy.engine import Decision, PolicyEngine, Reason, Request
from concord_protocol.policy.facts import (
    ConsortiumFacts,
    DatasetFacts,
    Number,
    StudyFacts,
    build_study_facts,
)
from concord_protocol.principals import Principal

__all__ = [
    "check_read_report",
    "check_release",
    "check_round",
    "check_site_approval",
    "check_submission",
    "combine",
]


def combine(decisions: Sequence[Decision], extra_denials: Sequence[Reason] = ()) -> Decision:
    """AND of decisions: allowed only if every one is (and there are no extra denials).

    When denied, the reasons are every denying decision's reasons plus ``extra_denials``;
    when allowed, every decision's (permit) reasons. Repeats (same policy, same sentence,
    same source) are dropped. The first decision's policy-set hash is kept (callers that
    mix a consortium and a site set record both, see :func:`check_site_approval`).
    """
    if not decisions and not extra_denials:
        raise ValueError("combine() needs at least one decision: an empty AND is not a decision")
    allowed = all(d.allowed for d in decisions) and not extra_denials
    pool = [d for d in decisions if allowed or not d.allowed]
    seen: set[tuple[str, str, str]] = set()
    reasons: list[Reason] = []
    for reason in [*extra_denials, *(r for d in pool for r in d.reasons)]:
        key = (reason.policy_id, reason.text, reason.source)
        if key not in seen:
            seen.add(key)
            reasons.append(reason)
    site_hashes = [d.site_policy_set_hash for d in decisions if d.site_policy_set_hash]
    return Decision(
        allowed=allowed,
        reasons=reasons,
        errors=[e for d in decisions for e in d.errors],
        policy_set_hash=decisions[0].policy_set_hash if decisions else "",
        site_policy_set_hash=site_hashes[0] if site_hashes else None,
    )


def _missing_datasets(contract: StudyContract, datasets: Sequence[DatasetFacts]) -> list[Reason]:
    known = {d.id for d in datasets}
    return [
        Reason(
            "catalogue.dataset-known",
            f"Dataset {name} is not in the consortium catalogue.",
            f"dataset {name}",
        )
        for name in contract.datasets
        if name not in known
    ]


def _per_dataset(
    engine: PolicyEngine,
    action: str,
    facts: StudyFacts,
    contexts: Mapping[str, dict[str, Any]],
) -> list[Decision]:
    """Evaluate ``action`` by the study owner on each dataset in ``contexts`` (id -> context)."""
    requests = [
        Request(action, facts.owner, facts.datasets[dataset_id], dict(context))
        for dataset_id, context in contexts.items()
    ]
    return engine.evaluate_batch(requests, facts.entities)


def check_submission(
    engine: PolicyEngine,
    contract: StudyContract,
    datasets: Sequence[DatasetFacts],
    principal: Principal,
    facts: ConsortiumFacts,
    *,
    remaining_epsilon: Mapping[str, Number],
) -> Decision:
    """May ``principal`` submit ``contract``? Evaluates SubmitStudy on every dataset.

    ``datasets``: the catalogue rows the contract names (a name with no row is a denial
    reason). ``remaining_epsilon``: dataset id -> lifetime epsilon left on the ledger
    (``budgets.service.remaining_epsilon``). Returns every reason of every dataset.
    """
    missing = _missing_datasets(contract, datasets)
    study = build_study_facts(
        contract, datasets, principal, facts, remaining_epsilon=remaining_epsilon
    )
    context = study.study_context()
    decisions = _per_dataset(engine, "SubmitStudy", study, {d: context for d in study.datasets})
    if not decisions:
        return Decision(False, missing, [], engine.policy_set_hash)
    return combine(decisions, missing)


def check_site_approval(
    consortium: PolicyEngine,
    site: PolicyEngine | None,
    contract: StudyContract,
    datasets: Sequence[DatasetFacts],
    owner: Principal,
    facts: ConsortiumFacts,
    *,
    site_id: str,
    remaining_epsilon: Mapping[str, Number],
    study_id: str | None = None,
) -> Decision:
    """May site ``site_id`` let the study use its datasets? Consortium AND site policy.

    ``datasets``: every dataset of the study (site counts need them all); only this
    site's are evaluated. ``owner``: the study owner (``facts.owner_principal`` builds one
    from the stored subject and organisation). ``site``: the site's own policy set (loaded
    with the same schema), which can only add denials; None where the site's own policy is
    enforced at the site (the consortium server does not hold sites' policies).
    """
    missing = _missing_datasets(contract, datasets)
    study = build_study_facts(
        contract,
        datasets,
        owner,
        facts,
        remaining_epsilon=remaining_epsilon,
        study_id=study_id,
        state="awaiting_approvals",
    )
    mine = [d.id for d in datasets if d.site_id == site_id and d.id in study.datasets]
    if not mine:
        reason = Reason(
            "site.has-datasets",
            f"Site {site_id} has no dataset in this study.",
            f"site {site_id}",
        )
        return Decision(
            False,
            [reason, *missing],
            [],
            consortium.policy_set_hash,
            site.policy_set_hash if site is not None else None,
        )
    contexts = {dataset_id: study.study_context() for dataset_id in mine}
    consortium_decisions = _per_dataset(consortium, "UseDataset", study, contexts)
    site_decisions = _per_dataset(site, "UseDataset", study, contexts) if site else []
    combined = combine([*consortium_decisions, *site_decisions], missing)
    return _with_site_hash(combined, consortium, site)


def _with_site_hash(
    decision: Decision, consortium: PolicyEngine, site: PolicyEngine | None
) -> Decision:
    return Decision(
        allowed=decision.allowed,
        reasons=decision.reasons,
        errors=decision.errors,
        policy_set_hash=consortium.policy_set_hash,
        site_policy_set_hash=site.policy_set_hash if site is not None else None,
    )


def check_round(
    engine: PolicyEngine,
    contract: StudyContract,
    datasets: Sequence[DatasetFacts],
    owner: Principal,
    facts: ConsortiumFacts,
    *,
    study_id: str,
    round_number: int,
    participating_sites: int,
    reservation_remaining: Mapping[str, Number],
    site_engine: PolicyEngine | None = None,
    site_id: str | None = None,
) -> Decision:
    """May round ``round_number`` run? RunRound per dataset.

    Consortium side: leave ``site_id`` out to check every dataset. Site side: pass the
    site's ``site_id`` (only its datasets are checked) and its ``site_engine``.
    ``reservation_remaining``: dataset id -> what is left of the study's reservation
    (``budgets.service.reservation_remaining``); a dataset missing from it has nothing left.
    """
    missing = _missing_datasets(contract, datasets)
    study = build_study_facts(
        contract,
        datasets,
        owner,
        facts,
        remaining_epsilon={},
        study_id=study_id,
        state="running",
    )
    ids = [
        d.id
        for d in datasets
        if d.id in study.datasets and (site_id is None or d.site_id == site_id)
    ]
    contexts = {
        dataset_id: study.round_context(
            round_number, participating_sites, reservation_remaining.get(dataset_id, 0)
        )
        for dataset_id in ids
    }
    decisions = _per_dataset(engine, "RunRound", study, contexts)
    if site_engine is not None:
        decisions += _per_dataset(site_engine, "RunRound", study, contexts)
    if not decisions:
        return Decision(False, missing, [], engine.policy_set_hash)
    return _with_site_hash(combine(decisions, missing), engine, site_engine)


def check_release(
    engine: PolicyEngine,
    contract: StudyContract,
    datasets: Sequence[DatasetFacts],
    owner: Principal,
    requester: Principal,
    facts: ConsortiumFacts,
    *,
    study_id: str,
    state: str,
    sites_signed_off: int,
) -> Decision:
    """May ``requester`` release the study's final model and report (ReleaseModel)?

    ``state``: the study's lifecycle state (``completed`` to pass the shipped rules);
    ``sites_signed_off``: how many of the study's sites signed off the release.
    """
    study = build_study_facts(
        contract,
        datasets,
        owner,
        facts,
        remaining_epsilon={},
        study_id=study_id,
        state=state,
        others=[requester],
    )
    request = Request(
        "ReleaseModel",
        study.principal(requester),
        study.study,
        {"sites_signed_off": int(sites_signed_off)},
    )
    return engine.evaluate_batch([request], study.entities)[0]


def check_read_report(
    engine: PolicyEngine,
    contract: StudyContract,
    datasets: Sequence[DatasetFacts],
    owner: Principal,
    reader: Principal,
    facts: ConsortiumFacts,
    *,
    study_id: str,
    state: str,
) -> Decision:
    """May ``reader`` read the study's report (ReadReport)?"""
    study = build_study_facts(
        contract,
        datasets,
        owner,
        facts,
        remaining_epsilon={},
        study_id=study_id,
        state=state,
        others=[reader],
    )
    request = Request("ReadReport", study.principal(reader), study.study, {})
    return engine.evaluate_batch([request], study.entities)[0]
