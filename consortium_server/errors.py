"""Domain errors with stable codes, one public catalogue, and one translator at the HTTP edge.

Services raise :class:`DomainError` subclasses carrying a stable ``code``, built like every
Concord error: ``NotFoundError("No such study.", code="study.not_found")``. The catalogue maps
each code to an HTTP status and a public title; :func:`install_error_handlers` is the only
place that turns errors into responses. Clients see the code, a sanitised message and the
request id, never a stack trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from concord_protocol.errors import ConcordError

__all__ = [
    "CATALOGUE",
    "AuthenticationError",
    "ConflictError",
    "DomainError",
    "ForbiddenError",
    "InvalidRequestError",
    "NotFoundError",
    "PolicyDeniedError",
    "ServiceUnavailableError",
    "public_entry",
]


@dataclass(frozen=True)
class CatalogueEntry:
    """How one error code is shown to clients."""

    status: int
    title: str


#: Every code a client can see. Codes are stable: clients may switch on them.
CATALOGUE: dict[str, CatalogueEntry] = {
    "auth.missing_token": CatalogueEntry(401, "A bearer token is required."),
    "auth.invalid_token": CatalogueEntry(401, "The bearer token is not valid."),
    "auth.expired_token": CatalogueEntry(401, "The bearer token has expired."),
    "auth.issuer_unavailable": CatalogueEntry(503, "The identity provider cannot be reached."),
    "auth.forbidden": CatalogueEntry(403, "Your role does not allow this action."),
    "auth.site_revoked": CatalogueEntry(403, "This site has been revoked."),
    "request.invalid": CatalogueEntry(422, "The request is not valid."),
    "request.too_large": CatalogueEntry(413, "The request body is too large."),
    "resource.not_found": CatalogueEntry(404, "Not found."),
    "resource.conflict": CatalogueEntry(409, "The request conflicts with a concurrent change."),
    "site.not_found": CatalogueEntry(404, "No such site."),
    "site.exists": CatalogueEntry(409, "A site with this id or organisation is already enrolled."),
    "site.already_revoked": CatalogueEntry(409, "This site is already revoked."),
    "keys.rotation_invalid": CatalogueEntry(
        409, "The key rotation does not replace the site's current keys."
    ),
    "signature.invalid": CatalogueEntry(422, "The signature does not verify."),
    "dataset.not_found": CatalogueEntry(404, "No such dataset."),
    "dataset.exists": CatalogueEntry(409, "A dataset with this id already exists."),
    "study.not_found": CatalogueEntry(404, "No such study."),
    "study.invalid": CatalogueEntry(422, "The study contract is not valid."),
    "study.idempotency_conflict": CatalogueEntry(
        409, "This Idempotency-Key was used for another study draft."
    ),
    "study.invalid_transition": CatalogueEntry(
        409, "The study is not in a state that allows this."
    ),
    "approval.duplicate": CatalogueEntry(409, "This site has already decided on this study."),
    "approval.hash_mismatch": CatalogueEntry(
        409, "The contract hash does not match the study's contract."
    ),
    "approval.not_requested": CatalogueEntry(
        409, "This study does not use any dataset of this site."
    ),
    "approval.signature_invalid": CatalogueEntry(
        422, "The decision is not signed by the key the study's roster names for the site."
    ),
    "approval.roster_key_changed": CatalogueEntry(
        409, "The site changed its keys after the study was submitted; submit it again."
    ),
    "study.roster_mismatch": CatalogueEntry(
        409, "The draft's roster is not the one the catalogue and site directory give."
    ),
    "policy.denied": CatalogueEntry(403, "The data-use policy denies this."),
    "policy.invalid": CatalogueEntry(422, "The policy does not parse or validate."),
    "policy.version_not_found": CatalogueEntry(404, "No such policy version."),
    "policy.not_published": CatalogueEntry(503, "No policy set has been published yet."),
    "budget.exceeded": CatalogueEntry(409, "A dataset's privacy budget would be exceeded."),
    "budget.report_invalid": CatalogueEntry(
        422, "A site's reported epsilon is negative or not a finite number."
    ),
    "budget.report_fell": CatalogueEntry(
        409, "A site's cumulative epsilon fell below what the ledger already charged."
    ),
    "release.budget_overspent": CatalogueEntry(
        409, "The study spent more privacy budget than it reserved; it cannot be released."
    ),
    "budget.not_reserved": CatalogueEntry(
        409, "The study has no open budget reservation on this dataset."
    ),
    "budget.already_reserved": CatalogueEntry(
        409, "The study already holds a budget reservation on this dataset."
    ),
    "service.unavailable": CatalogueEntry(503, "A backing service is unavailable; try again."),
    "federation.disabled": CatalogueEntry(
        404, "Runs are disabled on this server: no SuperLink is configured."
    ),
    "federation.superlink_error": CatalogueEntry(
        502, "The SuperLink did not accept the request; nothing was changed."
    ),
    "federation.round_out_of_order": CatalogueEntry(
        409, "The round is not the study's next round."
    ),
    "federation.checkpoint_missing": CatalogueEntry(
        409, "No aggregate is stored for this round; upload it before reporting the round."
    ),
    "federation.report_invalid": CatalogueEntry(
        422, "The round report names another study or contract."
    ),
    "federation.attempt_stale": CatalogueEntry(409, "This run attempt was replaced; it must stop."),
    "federation.bundle_not_allowed": CatalogueEntry(
        403, "The run's app bundle is not Concord's: the SuperLink runs no ServerApp for it."
    ),
    # Codes of the shared protocol code (concord_protocol.errors), as the API answers them.
    "update.malformed": CatalogueEntry(422, "The update is not valid in the wire format."),
    "update.malformed_header": CatalogueEntry(422, "The update's header is not valid."),
    "update.wrong_chunk_count": CatalogueEntry(
        422, "The update does not have the chunks its header announces."
    ),
    "update.digest_mismatch": CatalogueEntry(422, "An update chunk does not match its digest."),
    "update.undecodable_chunk": CatalogueEntry(422, "An update chunk cannot be decoded."),
    "update.size_mismatch": CatalogueEntry(422, "An update chunk has the wrong size."),
    "update.header_mismatch": CatalogueEntry(
        422, "The update's header names another study, round or scheme."
    ),
    "model.unknown": CatalogueEntry(422, "No catalogue model has this name and version."),
    "model.invalid_hyperparameter": CatalogueEntry(
        422, "A hyperparameter is unknown, of the wrong type, or out of range."
    ),
    "model.incompatible_input": CatalogueEntry(422, "The datasets' input does not suit the model."),
    "audit.invalid_proof": CatalogueEntry(422, "The Merkle proof does not verify."),
    "audit.entry_not_found": CatalogueEntry(404, "No audit entry with this index."),
    "audit.head_not_found": CatalogueEntry(404, "No signed tree head with this size and root."),
    "audit.invalid_range": CatalogueEntry(422, "The index or tree sizes are outside the log."),
    "audit.key_invalid": CatalogueEntry(422, "The key is not a valid Ed25519 key."),
    "audit.head_signature_invalid": CatalogueEntry(
        422, "The tree head is not signed by the server's key."
    ),
    "audit.cosignature_invalid": CatalogueEntry(
        422, "The cosignature does not verify with the site's registered key."
    ),
    "audit.cosignature_wrong_log": CatalogueEntry(
        422, "The cosignature names another log than this server's."
    ),
    "audit.cosignature_time_invalid": CatalogueEntry(
        422, "The cosignature is dated before the head it cosigns, or in the future."
    ),
    "audit.cosignature_conflict": CatalogueEntry(
        409, "This site already cosigned a different root for this tree size."
    ),
    "audit.tree_shrunk": CatalogueEntry(409, "The tree is smaller than the last cosigned head."),
    "audit.tree_inconsistent": CatalogueEntry(
        409, "The tree head is not consistent with the last cosigned head."
    ),
    "audit.head_stale": CatalogueEntry(409, "The tree head is older than the last cosigned head."),
    "audit.witness_state_invalid": CatalogueEntry(
        500, "The witness state file is damaged or belongs to another log."
    ),
    "audit.export_invalid": CatalogueEntry(422, "The audit export is not valid."),
    "audit.log_corrupt": CatalogueEntry(500, "The audit log failed an integrity check."),
    "keys.not_study_site": CatalogueEntry(
        403, "Only an approved site of this study may relay or fetch its key."
    ),
    "keys.study_not_ready": CatalogueEntry(409, "The study is not approved or running."),
    "keys.exists": CatalogueEntry(409, "This study's key has already been relayed."),
    "keys.invalid": CatalogueEntry(422, "The study keys are not valid."),
    "keys.secret_context": CatalogueEntry(
        422, "The context holds the secret key; the server only takes the public context."
    ),
    "keys.not_found": CatalogueEntry(404, "No study key for your site."),
    "release.not_completed": CatalogueEntry(
        409, "The study is not completed; its results cannot be released now."
    ),
    "release.no_aggregate": CatalogueEntry(404, "No final aggregate is stored for this study."),
    "release.aggregate_invalid": CatalogueEntry(
        422, "The final aggregate is malformed or belongs to another study."
    ),
    "release.aggregate_exists": CatalogueEntry(
        409, "A different final aggregate is already stored for this study."
    ),
    "release.not_study_site": CatalogueEntry(403, "Only a site of this study may do this."),
    "release.signature_invalid": CatalogueEntry(
        422, "The sign-off signature does not verify with the site's registered key."
    ),
    "release.already_signed_off": CatalogueEntry(
        409, "This site already signed off a different model hash."
    ),
    "release.model_invalid": CatalogueEntry(
        422, "The model bytes are not the model this site signed off."
    ),
    "release.model_exists": CatalogueEntry(
        409, "A different model was already uploaded for this study."
    ),
    "release.layout_invalid": CatalogueEntry(
        422, "The parameter layout does not fit the model (names, shapes or sizes)."
    ),
    "release.layout_exists": CatalogueEntry(
        409, "A different parameter layout was already uploaded for this model."
    ),
    "release.layout_missing": CatalogueEntry(
        409, "The model was uploaded without its parameter layout: no model file yet."
    ),
    "release.signoffs_missing": CatalogueEntry(
        409, "Not every site of the study has signed off the final model."
    ),
    "release.hash_mismatch": CatalogueEntry(
        409, "The sites signed off different model hashes; this model is never released."
    ),
    "release.model_missing": CatalogueEntry(409, "No site has uploaded the signed-off model yet."),
    "release.not_released": CatalogueEntry(409, "The study's results have not been released."),
    "internal": CatalogueEntry(500, "Internal error."),
}


class DomainError(ConcordError):
    """An error the domain knows about. Its ``code`` must be in :data:`CATALOGUE`.

    Built like every Concord error, ``DomainError(message, *, code=..., details=...)``;
    each subclass names its default code. ``message`` is shown to the client (keep patient
    data and secrets out of it); ``details`` is a list of structured items (for example one
    per invalid field).
    """

    code = "internal"

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        details: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        chosen = code or type(self).code
        if chosen not in CATALOGUE:
            raise ValueError(f"unknown error code {chosen!r}: add it to CATALOGUE")
        super().__init__(message, code=chosen, details=details)

    def __str__(self) -> str:
        return self.public_message()

    @property
    def status(self) -> int:
        """HTTP status for this error."""
        return CATALOGUE[self.code].status

    def public_message(self) -> str:
        """Text for the client: the specific message if there is one, else the catalogue title."""
        return self.message or CATALOGUE[self.code].title


class AuthenticationError(DomainError):
    """The caller could not be authenticated (401)."""

    code = "auth.invalid_token"


class ForbiddenError(DomainError):
    """The caller is authenticated but not allowed (403)."""

    code = "auth.forbidden"


class NotFoundError(DomainError):
    """The object does not exist or is not visible to the caller (404)."""

    code = "resource.not_found"


class ConflictError(DomainError):
    """The request conflicts with the current state (409)."""

    code = "resource.conflict"


class InvalidRequestError(DomainError):
    """The request is well-formed JSON but not acceptable (422)."""

    code = "request.invalid"


class PolicyDeniedError(DomainError):
    """A data-use policy denied the action; ``details`` carries the reasons."""

    code = "policy.denied"


class ServiceUnavailableError(DomainError):
    """A backing service (database, identity provider) is down (503)."""

    code = "service.unavailable"


def public_entry(code: str) -> CatalogueEntry:
    """Catalogue entry for ``code`` (``internal`` for unknown codes)."""
    return CATALOGUE.get(code, CATALOGUE["internal"])
