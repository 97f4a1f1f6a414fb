"""Schema building blocks shared by the domain routers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

__all__ = ["ErrorBody", "ErrorResponse", "Sha256Hex", "Slug", "StrictModel"]

Slug = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", strip_whitespace=True)
]


#: A SHA-256 digest as lowercase hex (contract hashes, tree roots, key ids, model hashes).
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class StrictModel(BaseModel):
    """Bodies whose unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """The error part of every non-2xx response."""

    code: str
    message: str
    details: list[dict[str, object]] = []
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """Shape of every error response: ``{"error": {...}}``."""

    error: ErrorBody
