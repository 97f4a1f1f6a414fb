"""Schema building blocks shared by the domain routers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from concord_protocol.fields import Sha256Hex, Slug

__all__ = ["ErrorBody", "ErrorResponse", "Sha256Hex", "Slug", "StrictModel"]


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
