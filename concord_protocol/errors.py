"""The root of Concord's errors, and the errors of the shared protocol code.

Every error Concord raises on purpose carries a stable dotted ``code`` (callers switch on
it, never on the message), a ``message`` safe to show and log (no patient data, no key
material, no tensor values), optional structured ``details`` and an optional ``hint``
saying what to do next. One constructor order everywhere::

    SomeError(message, *, code=..., details=..., hint=...)

The hierarchy::

    ConcordError
    ├── consortium_server.errors.DomainError   (the server's root, mapped to HTTP once)
    ├── site_node.errors.SiteError             (the site's root)
    └── the shared code's own errors, below:
        ├── CryptoError: ContextError, WireFormatError
        ├── AuditVerificationError, InvalidProofError
        ├── PolicyLoadError
        ├── CatalogueError: UnknownModelError, InvalidHyperparameterError,
        │   IncompatibleInputError
        ├── IdentityProviderError
        ├── ReleasedModelError (a released model file or its card does not hold up)
        └── ApiError (the consortium API answered with an error, or not at all)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ApiError",
    "AuditVerificationError",
    "CatalogueError",
    "ConcordError",
    "ContextError",
    "CryptoError",
    "IdentityProviderError",
    "IncompatibleInputError",
    "InvalidHyperparameterError",
    "InvalidProofError",
    "PolicyLoadError",
    "ReleasedModelError",
    "UnknownModelError",
    "WireFormatError",
]


class ConcordError(Exception):
    """Base of every Concord error: a stable ``code``, a safe ``message``, ``details``.

    Subclasses set a class-level default ``code``; a caller may name a more specific one.
    """

    code: str = "concord.error"
    hint: str | None = None

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        details: Sequence[Mapping[str, Any]] = (),
        hint: str | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message
        self.details: list[dict[str, Any]] = [dict(item) for item in details]
        self.hint = hint
        super().__init__(message or self.code)

    def diagnostics(self) -> str:
        """The message plus, when known, what to do next."""
        if self.hint:
            return f"{self.message}\nHint: {self.hint}"
        return self.message

    def __str__(self) -> str:
        return self.message or self.code


# --- crypto and the wire format ----------------------------------------------------------


class CryptoError(ConcordError):
    """Encrypted material that cannot be used as given (never holds keys or values)."""

    code = "crypto.error"


class ContextError(CryptoError):
    """A CKKS context is unreadable, or holds (or lacks) the secret key against expectation.

    Codes: ``crypto.context_invalid``, ``crypto.context_not_private`` (a site needs the
    secret key), ``crypto.context_has_secret`` (the server must never be given it).
    """

    code = "crypto.context_invalid"


class WireFormatError(CryptoError):
    """Bytes on the wire do not form a valid update (header, chunk count, digests, chunks).

    Codes: ``update.malformed_header``, ``update.wrong_chunk_count``,
    ``update.digest_mismatch``, ``update.undecodable_chunk``, ``update.size_mismatch``,
    ``update.header_mismatch``, ``update.malformed``.
    """

    code = "update.malformed"


# --- audit ---------------------------------------------------------------------------------


class AuditVerificationError(ConcordError):
    """A key, tree-head signature or cosignature of the audit log does not verify.

    Codes: ``audit.key_invalid``, ``audit.head_signature_invalid``,
    ``audit.cosignature_invalid``.
    """

    code = "audit.head_signature_invalid"


class InvalidProofError(ConcordError, ValueError):
    """A Merkle proof, size or index did not verify. ``reason`` says which check failed."""

    code = "audit.invalid_proof"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- policies ------------------------------------------------------------------------------


class PolicyLoadError(ConcordError):
    """A policy set (or its schema) does not parse or validate; names the file and line."""

    code = "policy.invalid"

    def __init__(
        self,
        file: str,
        problem: str,
        line: int | None = None,
        problems: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.file = file
        self.line = line
        self.problem = problem
        where = f"{file}, line {line}" if line is not None else file
        details = list(problems) or [{"file": file, "line": line, "message": problem}]
        super().__init__(f"{where}: {problem}", details=details)


# --- the model catalogue ---------------------------------------------------------------------


class CatalogueError(ConcordError):
    """A study names a model the catalogue cannot provide as asked."""

    code = "model.invalid"


class UnknownModelError(CatalogueError):
    """No catalogue entry has this name and version."""

    code = "model.unknown"


class IncompatibleInputError(CatalogueError):
    """The dataset's input shape (or class count) does not suit the chosen model."""

    code = "model.incompatible_input"


class InvalidHyperparameterError(CatalogueError):
    """A hyperparameter is unknown, of the wrong type, or out of range.

    Attributes:
        name: the offending hyperparameter.
    """

    code = "model.invalid_hyperparameter"

    def __init__(self, name: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"hyperparameter {name!r}: {message}", hint=hint)
        self.name = name


# --- identity --------------------------------------------------------------------------------


class IdentityProviderError(ConcordError):
    """The identity provider refused a token request or could not be reached.

    Codes: ``auth.invalid_token`` (credentials refused), ``auth.issuer_unavailable``.
    """

    code = "auth.issuer_unavailable"


# --- released models -------------------------------------------------------------------------


class ReleasedModelError(ConcordError):
    """A released model file (or the card or contract it is checked against) is refused.

    Raised by :mod:`concord_protocol.model_file` and the researcher's loader
    (:mod:`site_node.training.released`) before any weight is loaded. Codes:
    ``released_model.malformed`` (not a well-formed file of this format: header length,
    JSON, dtypes, offsets, metadata), ``released_model.layout_mismatch`` (the tensors' names,
    shapes, dtypes or offsets are not those of the catalogue network the file names),
    ``released_model.hash_mismatch`` (the parameters do not hash to the model hash),
    ``released_model.card_mismatch`` (the file and the model card disagree),
    ``released_model.contract_mismatch`` (the file is not of the given contract),
    ``released_model.signoff_invalid`` (a site's sign-off on the card does not verify with
    the key given for it, or a site's sign-off is missing).
    """

    code = "released_model.malformed"


# --- the consortium API ----------------------------------------------------------------------


class ApiError(ConcordError):
    """A non-2xx answer from the consortium API, or none at all (``code='connection'``).

    ``code`` is the server's stable code (``http`` when the body carried none); ``status`` the
    HTTP status (0 without an answer); ``request_id`` the server's id of the request.
    """

    code = "http"

    def __init__(
        self,
        message: str,
        *,
        code: str = "http",
        status: int = 0,
        details: Sequence[Mapping[str, Any]] = (),
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.status = status
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
