"""Study sync: mirror this site's approved study contracts into the local ApprovalStore.

One pass (:func:`sync_approvals`) lists the studies the site's ``site_node`` identity may
see and, for each:

* state ``approved`` or ``running`` and this site's decision ``approved``: the contract is
  re-hashed here (:meth:`StudyContract.contract_hash`) and must equal the study's
  ``contract_hash`` (and the site's approval hash, when the API reports one); only then is
  it recorded with :meth:`ApprovalStore.approve`. A mismatch is *refused*: nothing is
  recorded and the pass reports ``agent.contract_hash_mismatch``. The Flower ClientApp
  trains only on contracts in the store, so a server that alters a contract after the
  steward approved it cannot make the site train on it.
* state ``rejected``, ``aborted`` or ``failed``, or this site's decision is not
  ``approved``: every local approval of the study is revoked.

Recording is idempotent: a contract already in the store is left alone, so a second pass
changes nothing. The studies kept (:class:`ActiveStudy`) feed the key exchange.

The study API does not expose each approval's contract hash today; the server refuses an
approval of any other hash than the study's (``approval.hash_mismatch``) and the key relay
only serves sites whose approval names the study's hash, which is what this step relies on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.contract import StudyContract
from concord_protocol.errors import IdentityProviderError
from site_node.errors import SiteError
from site_node.federation.approvals import ApprovalError, ApprovalStore

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
    """A study this site approved and that may run: what the key exchange needs."""

    study_id: str
    contract_hash: str
    approved_sites: tuple[str, ...]
    encrypted: bool


@dataclass
class SyncResult:
    """What one sync pass did, by study id (refusals carry the error code)."""

    recorded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
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
    if hashes:
        result.revoked.append(study_id)


def _checked_contract(detail: dict[str, Any], mine: dict[str, Any]) -> tuple[StudyContract, str]:
    """The study's contract after re-hashing it here; raises :class:`AgentError`."""
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
    approval_hash = mine.get("contract_hash")
    if approval_hash is not None and approval_hash != computed:
        raise AgentError(
            f"study {study_id}: this site approved another contract hash than the study's",
            code="agent.approval_hash_mismatch",
        )
    return contract, computed


def sync_approvals(api: ConsortiumClient, *, site_id: str, store: ApprovalStore) -> SyncResult:
    """One sync pass (see the module docstring). API errors propagate (the caller retries)."""
    result = SyncResult()
    local = _local_approvals(store, result)
    for summary in api.list_studies():
        study_id = str(summary["id"])
        state = str(summary["state"])
        if state in WITHDRAWN_STATES:
            _revoke(store, study_id, local.get(study_id, set()), result)
            continue
        if state not in RUNNABLE_STATES:
            continue
        detail = api.get_study(study_id)
        sites: list[dict[str, Any]] = list(detail.get("sites", []))
        mine = next((s for s in sites if s.get("site_id") == site_id), None)
        if mine is None:
            continue
        if mine.get("decision") != "approved":
            _revoke(store, study_id, local.get(study_id, set()), result)
            continue
        try:
            contract, contract_hash = _checked_contract(detail, mine)
        except AgentError as exc:
            result.refused[study_id] = exc.code
            continue
        stale = local.get(study_id, set()) - {contract_hash}
        _revoke(store, study_id, stale, result)
        if contract_hash in local.get(study_id, set()):
            result.unchanged.append(study_id)
        else:
            try:
                store.approve(study_id, contract, contract_hash)
            except ApprovalError as exc:
                result.refused[study_id] = exc.code
                continue
            result.recorded.append(study_id)
        result.active.append(
            ActiveStudy(
                study_id=study_id,
                contract_hash=contract_hash,
                approved_sites=tuple(
                    sorted(str(s["site_id"]) for s in sites if s.get("decision") == "approved")
                ),
                encrypted=contract.encryption.enabled,
            )
        )
    return result
