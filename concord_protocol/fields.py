"""Field types every party validates the same way (pydantic ``Annotated`` types)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import StringConstraints

__all__ = ["Sha256Hex", "Slug", "format_utc", "utcnow"]

#: An identifier: lowercase letters, digits, ``.``, ``_`` and ``-``, up to 63 characters.
Slug = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", strip_whitespace=True)
]

#: A SHA-256 digest as lowercase hex (contract hashes, tree roots, key ids, model hashes).
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def format_utc(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a ``Z`` suffix (the one form that is hashed)."""
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
