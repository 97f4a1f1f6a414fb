"""Reviewing and deciding on a study at the site: where an approval is made.

``site-node study show <id>`` runs :func:`review_study`: it fetches the study, re-hashes its
contract, checks the contract's roster against this site's own keys and the peers hospital
IT pinned (:func:`site_node.peers.check_roster`), runs the consortium's policy *and the
site's own* (:func:`site_node.site_policy.check_study`, with the policy set the site's
settings name), and checks every decision other sites signed with the key pinned for them.

``site-node study approve <id> --hash <h>`` (and ``decline``) runs :func:`decide_study`:
the same review must pass (an approval; a decline needs only a valid contract), the hash
the steward names must be the one reviewed, and then the site signs a
:class:`~concord_protocol.site_decisions.SiteDecision` with its own key, stores the
approval in its :class:`~site_node.federation.approvals.ApprovalStore` (the only thing
the ClientApp trains on) with the signed decision, and posts it. If the server cannot be
reached the decision is kept and the agent posts it on its next pass. The demo approves
through this same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.contract import StudyContract
from concord_protocol.fields import format_utc, utcnow
from concord_protocol.policy.engine import Decision, PolicyEngine
from concord_protocol.site_decisions import SignedDecision, SiteDecision, sign_decision
from concord_protocol.site_keys import SignatureError
from site_node.crypto.sealing import SiteKeyPair
from site_node.errors import SiteError
from site_node.federation.approvals import ApprovalStore
from site_node.peers import Peer, PeerStore, check_roster, own_keys
from site_node.site_policy import check_study

__all__ = [
    "PeerDecision",
    "Problem",
    "StudyDecisionError",
    "StudyReview",
    "decide_study",
    "review_study",
    "verified_decisions",
]


class StudyDecisionError(SiteError):
    """The site refuses to decide as asked; ``code`` says why, ``details`` lists problems."""

    code = "study.refused"


@dataclass(frozen=True)
class Problem:
    """One reason the site cannot approve the study."""

    code: str
    message: str


@dataclass(frozen=True)
class PeerDecision:
    """Another site's decision as the server shows it, and whether its signature holds."""

    site_id: str
    decision: str | None
    verified: bool
    note: str = ""


@dataclass
class StudyReview:
    """What the site found about one study."""

    study_id: str
    state: str
    contract_hash: str
    contract: StudyContract | None
    problems: list[Problem] = field(default_factory=list)
    policy: Decision | None = None
    peers: list[PeerDecision] = field(default_factory=list)
    study: dict[str, Any] = field(default_factory=dict)

    @property
    def approvable(self) -> bool:
        """True when nothing stops this site from approving."""
        return self.contract is not None and not self.problems


def _signed_of(study_id: str, row: dict[str, Any]) -> SignedDecision | None:
    if not row.get("signature") or not row.get("decision"):
        return None
    try:
        return SignedDecision(
            decision=SiteDecision(
                study_id=study_id,
                contract_hash=str(row.get("contract_hash")),
                site_id=str(row.get("site_id")),
                decision=row["decision"],
                reason=str(row.get("reason") or ""),
                decided_at=str(row.get("signed_at")),
            ),
            signature=row["signature"],
        )
    except ValidationError:
        return None


def verified_decisions(
    study: dict[str, Any], contract: StudyContract, peers: dict[str, Peer]
) -> list[PeerDecision]:
    """Each roster member's decision as the server shows it, checked with the pinned key.

    A decision counts as ``verified`` only if it is signed for this study and this exact
    contract hash by the key pinned for that site; the server's word alone never does.
    """
    study_id = str(study["id"])
    contract_hash = contract.contract_hash()
    shown = {str(s.get("site_id")): s for s in study.get("sites", [])}
    result = []
    for member in contract.roster:
        row = shown.get(member.site_id, {})
        decision = row.get("decision")
        if decision is None:
            result.append(PeerDecision(member.site_id, None, False, "no decision yet"))
            continue
        peer = peers.get(member.site_id)
        signed = _signed_of(study_id, row)
        if signed is None:
            result.append(PeerDecision(member.site_id, decision, False, "not signed"))
        elif signed.decision.contract_hash != contract_hash:
            result.append(PeerDecision(member.site_id, decision, False, "for another contract"))
        elif peer is None:
            result.append(PeerDecision(member.site_id, decision, False, "site not pinned here"))
        else:
            try:
                signed.verify(peer.keys.signing_public_key)
            except SignatureError:
                result.append(PeerDecision(member.site_id, decision, False, "bad signature"))
            else:
                result.append(PeerDecision(member.site_id, decision, True))
    return result


def review_study(
    api: ConsortiumClient,
    study_id: str,
    *,
    site_id: str,
    keys: SiteKeyPair,
    peers: PeerStore,
    engine: PolicyEngine,
) -> StudyReview:
    """Fetch and check one study (see the module). Never raises for what it finds."""
    study = api.get_study(study_id)
    review = StudyReview(
        study_id=str(study.get("id", study_id)),
        state=str(study.get("state")),
        contract_hash=str(study.get("contract_hash")),
        contract=None,
        study=study,
    )
    try:
        contract = StudyContract.model_validate(study.get("contract"))
    except ValidationError:
        review.problems.append(
            Problem("agent.contract_invalid", "the server sent a contract that is not valid")
        )
        return review
    if contract.contract_hash() != review.contract_hash:
        review.problems.append(
            Problem(
                "agent.contract_hash_mismatch",
                "the contract does not hash to the study's contract hash: do not approve",
            )
        )
        return review
    review.contract = contract
    pinned = peers.all()
    for problem in check_roster(
        contract.roster, site_id=site_id, own=own_keys(site_id, keys), peers=pinned
    ):
        review.problems.append(Problem(problem.code, problem.message))
    review.peers = verified_decisions(study, contract, pinned)
    review.policy = check_study(api, study, contract, site_id=site_id, site_engine=engine)
    if not review.policy.allowed:
        for reason in review.policy.reasons:
            review.problems.append(Problem("policy.denied", reason.text))
    return review


def decide_study(
    api: ConsortiumClient,
    review: StudyReview,
    *,
    decision: Literal["approved", "declined"],
    contract_hash: str,
    reason: str,
    site_id: str,
    keys: SiteKeyPair,
    store: ApprovalStore,
) -> tuple[SignedDecision, bool]:
    """Sign, store and post this site's decision; returns it and whether the server took it.

    Raises :class:`StudyDecisionError`: ``study.not_reviewed`` (the hash is not the one
    reviewed), ``study.refused`` (an approval the review does not allow; ``details`` lists
    the problems), ``study.not_decidable`` (not awaiting approvals), ``study.already_decided``.
    A server that cannot be reached leaves the decision stored, unposted (the agent posts
    it); a server that refuses it is reported as an :class:`ApiError` after the local
    approval was withdrawn again.
    """
    if review.contract is None or contract_hash != review.contract_hash:
        raise StudyDecisionError(
            "the hash you named is not the contract hash this site reviewed",
            code="study.not_reviewed",
            hint="Run `site-node study show <id>` and copy the hash it prints.",
        )
    if review.state != "awaiting_approvals":
        raise StudyDecisionError(
            f"the study is {review.state}; only studies awaiting approvals can be decided",
            code="study.not_decidable",
        )
    existing = store.decision(review.study_id)
    if existing is not None and existing[0].decision.contract_hash == contract_hash:
        raise StudyDecisionError(
            f"this site already {existing[0].decision.decision} the study",
            code="study.already_decided",
        )
    if decision == "approved" and not review.approvable:
        raise StudyDecisionError(
            "the site cannot approve this study: " + "; ".join(p.message for p in review.problems),
            details=[{"code": p.code, "message": p.message} for p in review.problems],
        )
    if decision == "declined" and not reason.strip():
        raise StudyDecisionError("a decline needs a reason", code="study.refused")
    signed = sign_decision(
        SiteDecision(
            study_id=review.study_id,
            contract_hash=contract_hash,
            site_id=site_id,
            decision=decision,
            reason=reason.strip(),
            decided_at=format_utc(utcnow()),
        ),
        keys.signing_key,
    )
    if decision == "approved":
        store.approve(review.study_id, review.contract, contract_hash)
    store.record_decision(signed)
    try:
        post_decision(api, signed)
    except ApiError as exc:
        if exc.status in (0, 429) or exc.status >= 500:
            return signed, False
        if decision == "approved":
            store.revoke(contract_hash)
        raise
    store.mark_posted(review.study_id)
    return signed, True


def post_decision(api: ConsortiumClient, signed: SignedDecision) -> dict[str, Any]:
    """Post a signed decision to ``/api/v1/studies/{id}/approvals``."""
    return api.decide(signed)
