"""Study sync: follow the server's view of this site's studies, trusting only what the site
approved itself.

Approvals are made at the site (:mod:`site_node.studies`: ``site-node study approve``
signs the decision and records the contract in the
:class:`~site_node.federation.approvals.ApprovalStore`); the server's word that this site
approved something is never enough. One pass (:func:`sync_approvals`) lists the studies the
site's identity may see and, for each:

* state ``rejected``, ``aborted`` or ``failed``: every local approval of the study is
  revoked and its study key deleted (a server that lies here can only stop the site
  taking part: denial of service, nothing more);
* the server answers ``auth.site_revoked``: this site was revoked, and a revoked site
  reads nothing any more, so every local approval is revoked and every study key deleted
  (the same denial of service at most, from a lying server);
* a signed decision of this site that the server does not have yet (it was down when the
  steward decided) is posted again;
* state ``approved`` or ``running`` with a local approval: the served contract is
  re-hashed here and must be the approved one; its roster and key generator then come
  from the *local* copy, and the roster members whose signed approval verifies with the
  key pinned for them (this site: its own local approval) make
  :attr:`ActiveStudy.approved_sites`, which the key exchange relies on. A study the server
  calls runnable that this site did not approve is ignored (``unapproved``); one whose
  served contract differs from the approved one is refused
  (``agent.contract_hash_mismatch``) and nothing about the local approval changes.

Idempotent: a second pass changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.contract import StudyContract
from concord_protocol.errors import IdentityProviderError
from site_node.errors import SiteError
from site_node.federation.approvals import ApprovalError, ApprovalStore
from site_node.peers import Peer
from site_node.studies import verified_decisions

__all__ = [
    "RUNNABLE_STATES",
    "TRANSIENT_STATUSES",
    "WITHDRAWN_STATES",
    "ActiveStudy",
    "AgentError",
    "SyncResult",
    "is_transient",
    "sync_approvals",
]

#: Study states in which a site trains (and holds an approval and a study key).
RUNNABLE_STATES = frozenset({"approved", "running"})
#: Study states after which a local approval is withdrawn.
WITHDRAWN_STATES = frozenset({"rejected", "aborted", "failed"})


class AgentError(SiteError):
    """The site agent refused something the server sent, or cannot act; ``code`` says what
    (``agent.*``)."""

    code = "agent.refused"


#: HTTP statuses worth retrying (0: no answer at all). 401 is retried once the caller has
#: dropped its cached token.
TRANSIENT_STATUSES = frozenset({0, 401, 408, 425, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """True for errors another try may not hit: network, overload, an expired token, or
    the identity provider being unreachable while fetching a token."""
    if isinstance(exc, IdentityProviderError):
        return exc.code == "auth.issuer_unavailable"
    return isinstance(exc, ApiError) and exc.status in TRANSIENT_STATUSES


@dataclass(frozen=True)
class ActiveStudy:
    """A study this site approved and that may run: what the key exchange needs.

    ``roster`` and ``key_generator`` are from the contract this site approved;
    ``approved_sites`` are the roster members whose approval this site verified.
    """

    study_id: str
    contract_hash: str
    roster: tuple[str, ...]
    key_generator: str
    approved_sites: tuple[str, ...]
    encrypted: bool

    @property
    def fully_approved(self) -> bool:
        """Every roster member's signed approval verified here."""
        return set(self.approved_sites) >= set(self.roster)


@dataclass
class SyncResult:
    """What one sync pass did, by study id (refusals carry the error code)."""

    recorded: list[str] = field(default_factory=list)  # decisions posted on this pass
    unchanged: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    unapproved: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    active: list[ActiveStudy] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was refused."""
        return not self.refused

    def summary(self) -> dict[str, int]:
        """Counts for the log."""
        return {
            "recorded": len(self.recorded),
            "unchanged": len(self.unchanged),
            "revoked": len(self.revoked),
            "unapproved": len(self.unapproved),
            "refused": len(self.refused),
        }


def _local_approvals(store: ApprovalStore, result: SyncResult) -> dict[str, set[str]]:
    """Study id -> contract hashes approved locally (a damaged record is reported)."""
    local: dict[str, set[str]] = defaultdict(set)
    for contract_hash in sorted(store.approved_hashes()):
        try:
            record = store.get(contract_hash)
        except (ApprovalError, ValidationError, ValueError, KeyError):
            result.refused[f"approval:{contract_hash[:16]}"] = "approval.corrupt"
            continue
        if record is not None:
            local[record.study_id].add(contract_hash)
    return local


def _revoke(store: ApprovalStore, study_id: str, hashes: set[str], result: SyncResult) -> None:
    for contract_hash in sorted(hashes):
        store.revoke(contract_hash)
    dropped = store.delete_study_key(study_id)
    if hashes or dropped:
        result.revoked.append(study_id)


def _served_contract(detail: dict[str, Any]) -> str:
    """The hash of the contract the server serves now, re-computed here."""
    study_id = str(detail.get("id"))
    try:
        contract = StudyContract.model_validate(detail["contract"])
    except (KeyError, ValidationError):
        raise AgentError(
            f"study {study_id}: the server sent a contract that is not a valid study contract",
            code="agent.contract_invalid",
        ) from None
    computed = contract.contract_hash()
    if computed != detail.get("contract_hash"):
        raise AgentError(
            f"study {study_id}: the contract does not hash to the study's contract hash",
            code="agent.contract_hash_mismatch",
            hint="Do not train; report this to the consortium operator (the contract changed).",
        )
    return computed


def _repost(api: ConsortiumClient, store: ApprovalStore, study_id: str, result: SyncResult) -> None:
    """Post this site's signed decision again if the server never recorded it."""
    held = store.decision(study_id)
    if held is None or held[1]:
        return
    try:
        api.decide(held[0])
    except ApiError as exc:
        if is_transient(exc):
            raise
        if exc.code != "approval.duplicate":
            result.refused[study_id] = exc.code
            return
    store.mark_posted(study_id)
    result.recorded.append(study_id)


def sync_approvals(
    api: ConsortiumClient,
    *,
    site_id: str,
    store: ApprovalStore,
    peers: Mapping[str, Peer] | None = None,
) -> SyncResult:
    """One sync pass (see the module docstring). API errors propagate (the caller retries).

    ``peers``: this site's pinned peers (:class:`~site_node.peers.PeerStore`), with which
    the other roster members' signed approvals are checked.
    """
    result = SyncResult()
    local = _local_approvals(store, result)
    pinned = dict(peers or {})
    try:
        studies = api.list_studies()
    except ApiError as exc:
        if exc.code != "auth.site_revoked":
            raise
        for study_id, hashes in sorted(local.items()):
            _revoke(store, study_id, hashes, result)
        return result
    for summary in studies:
        study_id = str(summary["id"])
        state = str(summary["state"])
        if state in WITHDRAWN_STATES:
            _revoke(store, study_id, local.get(study_id, set()), result)
            continue
        try:
            _repost(api, store, study_id, result)
        except ApprovalError as exc:
            result.refused[study_id] = exc.code
            continue
        if state not in RUNNABLE_STATES:
            continue
        mine = local.get(study_id, set())
        if not mine:
            result.unapproved.append(study_id)
            continue
        detail = api.get_study(study_id)
        try:
            served = _served_contract(detail)
        except AgentError as exc:
            result.refused[study_id] = exc.code
            continue
        if served not in mine:
            result.refused[study_id] = "agent.approval_hash_mismatch"
            continue
        approved = store.get(served)
        if approved is None:  # revoked between the listing and now
            continue
        contract = approved.contract
        verified = {
            d.site_id
            for d in verified_decisions(detail, contract, pinned)
            if d.verified and d.decision == "approved"
        }
        verified.add(site_id)
        result.unchanged.append(study_id)
        result.active.append(
            ActiveStudy(
                study_id=study_id,
                contract_hash=served,
                roster=contract.site_ids,
                key_generator=contract.key_generator,
                approved_sites=tuple(sorted(verified & set(contract.site_ids))),
                encrypted=contract.encryption.enabled,
            )
        )
    return result
