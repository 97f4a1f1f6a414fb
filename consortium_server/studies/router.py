"""/api/v1/studies: submit (researcher), decide per site (data steward), follow, abort.

Every state change and every site decision is recorded in the audit log in the same
transaction as the change.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status

from concord_protocol.audit.entries import Outcome
from concord_protocol.contract import StudyDraft
from concord_protocol.principals import Role
from consortium_server.api.deps import (
    ANY_MEMBER,
    AuditDep,
    CurrentPrincipal,
    SessionDep,
    SettingsDep,
    require_roles,
)
from consortium_server.policy.checks import PolicyContext, approval_gate, submission_gate
from consortium_server.studies import service
from consortium_server.studies.models import Study, StudyState
from consortium_server.studies.schemas import (
    ApprovalCreate,
    StudyAbort,
    StudyPublic,
    StudySummary,
)

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])


def _policy(request: Request) -> PolicyContext:
    context: PolicyContext = request.app.state.policy_context
    return context


def _record_new_events(audit: AuditDep, study: Study, before: int) -> None:
    audit.study_events(study, list(study.events[before:]))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.RESEARCHER)],
)
def submit_study(
    body: StudyDraft,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=r"^[A-Za-z0-9._:-]{8,128}$",
            description="Any unique string (a UUID): submitting again with the same key and "
            "draft returns the study already made (200, `Idempotent-Replayed: true`), with "
            "another draft 409 `study.idempotency_conflict`.",
        ),
    ] = None,
) -> StudyPublic:
    """Submit a study contract. A policy denial is returned as a `rejected` study with reasons.

    With an ``Idempotency-Key`` a retried submission (a lost answer, a client restart) never
    makes a second study."""
    if idempotency_key is not None:
        replayed = service.replayed_submission(
            session, body, actor=principal, idempotency_key=idempotency_key
        )
        if replayed is not None:
            response.status_code = status.HTTP_200_OK
            response.headers["Idempotent-Replayed"] = "true"
            return service.to_public(replayed)
    decisions: list[service.GateDecision] = []
    policy_gate = submission_gate(session, _policy(request))

    def gate(*args: object) -> service.GateDecision:
        decision = policy_gate(*args)  # type: ignore[arg-type]
        decisions.append(decision)
        return decision

    study = service.submit_study(
        session,
        body,
        actor=principal,
        approval_window=timedelta(days=settings.studies.approval_window_days),
        gate=gate,
        idempotency_key=idempotency_key,
    )
    decision = decisions[0] if decisions else None
    audit.record(
        "policy.decision",
        object_type="study",
        object_id=study.id,
        outcome=Outcome.SUCCESS if study.state is not StudyState.REJECTED else Outcome.DENIED,
        purpose=body.purpose.value,
        contract_hash=study.contract_hash,
        policy_set_hash=decision.policy_set_hash if decision else None,
        policy_allowed=decision.allowed if decision else None,
        details={"action": "SubmitStudy", "reasons": decision.reasons if decision else []},
    )
    _record_new_events(audit, study, 0)
    return service.to_public(study)


@router.get("", dependencies=[ANY_MEMBER])
def list_studies(
    session: SessionDep, principal: CurrentPrincipal, state: StudyState | None = None
) -> list[StudySummary]:
    """Studies you may see: your own (researcher), your site's (steward, site node), or all."""
    return [
        StudySummary.model_validate(s)
        for s in service.list_visible_studies(session, principal, state=state)
    ]


@router.get("/{study_id}", dependencies=[ANY_MEMBER])
def get_study(study_id: str, session: SessionDep, principal: CurrentPrincipal) -> StudyPublic:
    """A study with its contract, its contract hash, each site's decision and its history."""
    return service.to_public(service.get_visible_study(session, study_id, principal))


@router.post(
    "/{study_id}/approvals",
    status_code=status.HTTP_201_CREATED,
    dependencies=[require_roles(Role.DATA_STEWARD, Role.SITE_NODE)],
)
def decide(
    study_id: str,
    body: ApprovalCreate,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> StudyPublic:
    """Record your site's signed decision on the study's exact contract hash.

    The body is what `site-node study approve` (or `decline`) signed at the site; the
    signature must verify with the key the study's roster names for the site.
    """
    current = service.get_visible_study(session, study_id, principal)
    before = len(current.events)
    repeated = service.is_recorded(current, body)
    study = service.decide(
        session,
        study_id,
        body,
        actor=principal,
        gate=approval_gate(session, _policy(request)),
    )
    if repeated:  # the same signed decision again: already on record and in the log
        return service.to_public(study)
    audit.record(
        f"study.site_{body.decision.value}",
        object_type="study",
        object_id=study.id,
        purpose=str(study.contract.get("purpose")),
        contract_hash=study.contract_hash,
        details={
            "site_id": body.site_id,
            "reason": body.reason,
            "signed_at": body.decided_at,
            "signature": body.signature,
        },
    )
    _record_new_events(audit, study, before)
    return service.to_public(study)


@router.post(
    "/{study_id}/abort",
    dependencies=[require_roles(Role.RESEARCHER, Role.CONSORTIUM_ADMIN)],
)
def abort_study(
    study_id: str,
    body: StudyAbort,
    request: Request,
    session: SessionDep,
    principal: CurrentPrincipal,
    audit: AuditDep,
) -> StudyPublic:
    """Stop a study (its owner or a consortium admin); its unused budget is returned.

    A running study's Flower run is stopped too (its ServerApp is also told ``stop`` at its
    next heartbeat or round report).
    """
    found = service.get_visible_study(session, study_id, principal)
    before, running = len(found.events), found.state is StudyState.RUNNING
    study = service.abort_study(session, study_id, actor=principal, reason=body.reason)
    _record_new_events(audit, study, before)
    session.commit()  # the ServerApp must find the study aborted when its run stops
    manager = getattr(request.app.state, "run_manager", None)
    if running and manager is not None:
        manager.stop_runs([study.id])
    return service.to_public(study)
