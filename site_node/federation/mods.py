"""Flower mods of the site's ClientApp (in the style of Flower's ``LocalDpMod``).

:class:`ContractGuardMod` runs before every handler. It refuses, with an error reply that
the server records, any message whose run:

* names a contract hash this site's data steward has not approved (``contract.not_approved``);
* carries a contract that does not hash to that value (``contract.hash_mismatch``);
* names another study than the one approved under that hash (``contract.wrong_study``);
* sends round content for another study or hash than the run's (``contract.content_mismatch``).

It passes through messages whose type it does not guard (none at present: every message
type is guarded unless listed in ``pass_through``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from concord_protocol.contract import StudyContract
from site_node.errors import MessageRefusedError
from site_node.federation.approvals import ApprovalStore

__all__ = ["GUARD_ERROR_CODE", "ContractGuardMod", "GuardRefusalError", "check_contract"]

log = logging.getLogger("concord.federation.site")

#: Flower's ``ErrorCode.MOD_FAILED_PRECONDITION``: the reply's error code on refusal.
GUARD_ERROR_CODE = 6


class GuardRefusalError(MessageRefusedError):
    """Why a message was refused; ``code`` is stable (``contract.*``) and leads the reply."""

    code = "contract.not_approved"


def check_contract(store: ApprovalStore, run_config: dict[str, object]) -> StudyContract:
    """Return the approved contract of the run, or raise :class:`GuardRefusalError`."""
    claimed = str(run_config.get("contract-hash", ""))
    study_id = str(run_config.get("study-id", ""))
    if not claimed or claimed not in store.approved_hashes():
        raise GuardRefusalError(
            "this site has not approved the contract", code="contract.not_approved"
        )
    approved = store.get(claimed)
    if approved is None:  # pragma: no cover - raced with a revocation
        raise GuardRefusalError(
            "this site has not approved the contract", code="contract.not_approved"
        )
    try:
        sent = StudyContract.model_validate_json(str(run_config.get("contract", "")))
    except ValueError:
        raise GuardRefusalError(
            "the run's contract is malformed", code="contract.hash_mismatch"
        ) from None
    if sent.contract_hash() != claimed:
        raise GuardRefusalError(
            "the run's contract does not hash to its id", code="contract.hash_mismatch"
        )
    if approved.study_id != study_id:
        raise GuardRefusalError(
            "the hash was approved for another study", code="contract.wrong_study"
        )
    return approved.contract


class ContractGuardMod:
    """Refuse messages of runs whose contract the site did not approve.

    Args:
        store_for: builds the site's :class:`ApprovalStore` from the ClientApp context
            (usually from the node config's ``state-dir``).
        pass_through: message types not guarded (default: none).
    """

    def __init__(
        self,
        store_for: Callable[[Context], ApprovalStore],
        *,
        pass_through: Collection[str] = (),
    ) -> None:
        if not callable(store_for):
            raise TypeError("store_for must be callable")
        self._store_for = store_for
        self._pass_through = frozenset(pass_through)

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Check the run's contract, then call the next mod or the handler."""
        if msg.metadata.message_type in self._pass_through:
            return call_next(msg, ctxt)
        try:
            check_contract(self._store_for(ctxt), dict(ctxt.run_config))
            config = msg.content.config_records.get("config")
            if config is not None and (
                config.get("contract-hash") != ctxt.run_config.get("contract-hash")
                or config.get("study-id") != ctxt.run_config.get("study-id")
            ):
                raise GuardRefusalError(
                    "round content names another study or hash", code="contract.content_mismatch"
                )
        except GuardRefusalError as exc:
            log.warning("refused a %s message: %s", msg.metadata.message_type, exc.code)
            return Message(Error(code=GUARD_ERROR_CODE, reason=str(exc)), reply_to=msg)
        return call_next(msg, ctxt)
