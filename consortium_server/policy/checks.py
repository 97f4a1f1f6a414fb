"""Where the API meets the policy engine: facts from the database, gates for the studies
service, and the dry run researchers use before submitting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.contract import StudyContract, StudyDraft
from concord_protocol.policy.decisions import check_site_approval, check_submission
from concord_protocol.policy.engine import Decision, PolicyEngine
from concord_protocol.policy.facts import ConsortiumFacts, owner_principal
from concord_protocol.principals import Principal
from consortium_server.budgets import service as budgets
from consortium_server.datasets.models import Dataset
from consortium_server.datasets.service import get_datasets
from consortium_server.errors import InvalidRequestError
from consortium_server.policy.service import startup_engine
from consortium_server.sites.models import Site
from consortium_server.studies.models import Study
from consortium_server.studies.service import (
    ApprovalGate,
    GateDecision,
    SubmissionGate,
    complete_draft,
)

__all__ = [
    "ApprovalGate",
    "PolicyContext",
    "approval_gate",
    "dry_run",
    "load_site_organisations",
    "submission_gate",
    "to_gate_decision",
]


def load_site_organisations(session: Session) -> dict[str, str]:
    """Site id -> organisation for every enrolled site (for :class:`ConsortiumFacts`)."""
    rows = session.execute(select(Site.id, Site.organisation)).all()
    return {site_id: organisation for site_id, organisation in rows}


@dataclass(frozen=True)
class PolicyContext:
    """What the server knows beyond the database: the model catalogue and the members."""

    model_catalogue: frozenset[tuple[str, str]]
    member_organisations: frozenset[str]
    directory: Path

    def engine(self, session: Session) -> PolicyEngine:
        """The active policy set (seeding version 1 from ``directory`` if none exists)."""
        return startup_engine(session, self.directory)

    def facts(self, session: Session) -> ConsortiumFacts:
        """Consortium facts now: enrolled sites' organisations are members too."""
        sites = load_site_organisations(session)
        return ConsortiumFacts(
            model_catalogue=self.model_catalogue,
            member_organisations=self.member_organisations | frozenset(sites.values()),
            site_organisations=sites,
        )


def to_gate_decision(decision: Decision) -> GateDecision:
    """The studies service's view of a policy decision."""
    return GateDecision(
        allowed=decision.allowed,
        reasons=[reason.text for reason in decision.reasons] + list(decision.errors),
        policy_set_hash=decision.policy_set_hash,
    )


def _submission(
    session: Session,
    context: PolicyContext,
    contract: StudyContract,
    datasets: list[Dataset],
    principal: Principal,
) -> Decision:
    return check_submission(
        context.engine(session),
        contract,
        [d.facts() for d in datasets],
        principal,
        context.facts(session),
        remaining_epsilon=budgets.remaining_epsilon(session, contract.datasets),
    )


def dry_run(
    session: Session, context: PolicyContext, draft: StudyDraft, principal: Principal
) -> Decision:
    """The decision a submission of ``draft`` by ``principal`` would get now (with the
    roster the server would add; unknown datasets are refused as at submission)."""
    datasets, unknown = get_datasets(session, draft.datasets)
    if unknown:
        raise InvalidRequestError(
            f"Unknown dataset(s): {', '.join(unknown)}.",
            code="study.invalid",
            details=[{"field": "datasets", "message": f"unknown dataset {i!r}"} for i in unknown],
        )
    site_ids = {d.site_id for d in datasets}
    sites = {s.id: s for s in session.scalars(select(Site).where(Site.id.in_(site_ids)))}
    contract = complete_draft(draft, datasets, sites)
    return _submission(session, context, contract, datasets, principal)


def submission_gate(session: Session, context: PolicyContext) -> SubmissionGate:
    """The gate the studies service calls at submission."""

    def gate(
        contract: StudyContract, datasets: list[Dataset], principal: Principal
    ) -> GateDecision:
        return to_gate_decision(_submission(session, context, contract, datasets, principal))

    return gate


def approval_gate(session: Session, context: PolicyContext) -> ApprovalGate:
    """The gate the studies service calls when a site approves (consortium policy for that
    site's datasets; the site's own policy is enforced by the site)."""

    def gate(study: Study, site_id: str) -> GateDecision:
        contract = StudyContract.model_validate(study.contract)
        datasets, _unknown = get_datasets(session, contract.datasets)
        decision = check_site_approval(
            context.engine(session),
            None,
            contract,
            [d.facts() for d in datasets],
            owner_principal(study.owner_subject, study.owner_organisation),
            context.facts(session),
            site_id=site_id,
            remaining_epsilon=budgets.remaining_epsilon(session, contract.datasets),
            study_id=study.id,
        )
        return to_gate_decision(decision)

    return gate
