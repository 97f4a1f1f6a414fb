"""Schema building blocks shared by the domain routers."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

__all__ = ["ErrorBody", "ErrorResponse", "Slug", "StrictModel"]

Slug = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", strip_whitespace=True)
]


class StrictModel(BaseModel):
    """Request bodies: unknown fields are refused, not ignored."""

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
