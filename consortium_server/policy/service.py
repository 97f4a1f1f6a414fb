"""Policy versions: publish (an operator action), roll back, load the active set.

A policy change is an operator action through the API or CLI. :func:`publish_policy_set`
validates the new set against the schema first (an invalid set raises
:class:`~concord_protocol.policy.engine.PolicyLoadError` and nothing is stored), then
stores it as the next version and makes it active. It returns a :class:`PolicyChange`
saying what changed, for the caller to write to the audit log.

At first start the server seeds version 1 from ``policies/consortium/`` and
``policies/schema.cedarschema`` (:func:`startup_engine`); afterwards the database is the
source of truth, and the files are only the starting point and the place to write and
dry-run changes before publishing them.

Services take ``session``, flush, and never commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from concord_protocol.policy.engine import SCHEMA_FILENAME, PolicyEngine
from consortium_server.db.base import utcnow
from consortium_server.errors import DomainError, NotFoundError
from consortium_server.policy.models import PolicyVersion

__all__ = [
    "PolicyChange",
    "activate_version",
    "active_engine",
    "active_version",
    "engine_for",
    "get_version",
    "list_versions",
    "publish_policy_set",
    "read_policy_directory",
    "startup_engine",
]

_ENGINE_CACHE: dict[str, PolicyEngine] = {}
_ENGINE_CACHE_SIZE = 8


@dataclass(frozen=True)
class PolicyChange:
    """What a publish or rollback did, for the audit log."""

    version: PolicyVersion
    changed: bool
    previous_version: int | None
    previous_hash: str | None
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    schema_changed: bool = False

    def audit_details(self) -> dict[str, Any]:
        """JSON-ready summary for an audit entry."""
        return {
            "version": self.version.version,
            "policy_set_hash": self.version.policy_set_hash,
            "changed": self.changed,
            "previous_version": self.previous_version,
            "previous_hash": self.previous_hash,
            "added": self.added,
            "removed": self.removed,
            "modified": self.modified,
            "schema_changed": self.schema_changed,
            "published_by": self.version.published_by,
            "note": self.version.note,
        }


def read_policy_directory(policies_dir: Path) -> tuple[dict[str, str], str]:
    """The consortium policy files and the schema of a ``policies/`` directory:
    (``consortium/*.cedar`` name -> text, ``schema.cedarschema`` text)."""
    schema_path = policies_dir / SCHEMA_FILENAME
    consortium = policies_dir / "consortium"
    texts = {
        path.name: path.read_text(encoding="utf-8") for path in sorted(consortium.glob("*.cedar"))
    }
    return texts, schema_path.read_text(encoding="utf-8")


def engine_for(version: PolicyVersion) -> PolicyEngine:
    """The (cached) engine of a stored version; re-validated when first loaded."""
    cached = _ENGINE_CACHE.get(version.policy_set_hash)
    if cached is not None:
        return cached
    engine = PolicyEngine.load(dict(version.policies), version.schema_text)
    if len(_ENGINE_CACHE) >= _ENGINE_CACHE_SIZE:
        _ENGINE_CACHE.pop(next(iter(_ENGINE_CACHE)))
    _ENGINE_CACHE[engine.policy_set_hash] = engine
    return engine


def active_version(session: Session, *, lock: bool = False) -> PolicyVersion | None:
    """The active version (None before the first publish). ``lock``: FOR UPDATE."""
    query = select(PolicyVersion).where(PolicyVersion.active.is_(True))
    if lock:
        query = query.with_for_update()
    return session.scalars(query.order_by(PolicyVersion.version.desc()).limit(1)).first()


def active_engine(session: Session) -> PolicyEngine:
    """The engine of the active version; ``policy.not_published`` if there is none."""
    version = active_version(session)
    if version is None:
        raise DomainError("no policy set has been published yet", code="policy.not_published")
    return engine_for(version)


def list_versions(session: Session) -> list[PolicyVersion]:
    """Every published version, newest first."""
    return list(session.scalars(select(PolicyVersion).order_by(PolicyVersion.version.desc())))


def get_version(session: Session, version: int) -> PolicyVersion:
    """One version by number; ``policy.version_not_found`` if there is none."""
    row = session.scalars(select(PolicyVersion).where(PolicyVersion.version == version)).first()
    if row is None:
        raise NotFoundError(f"no policy version {version}", code="policy.version_not_found")
    return row


def _change(new: PolicyVersion, previous: PolicyVersion | None, *, changed: bool) -> PolicyChange:
    old_texts: Mapping[str, str] = previous.policies if previous else {}
    new_texts = new.policies
    return PolicyChange(
        version=new,
        changed=changed,
        previous_version=previous.version if previous else None,
        previous_hash=previous.policy_set_hash if previous else None,
        added=sorted(set(new_texts) - set(old_texts)),
        removed=sorted(set(old_texts) - set(new_texts)),
        modified=sorted(n for n in set(new_texts) & set(old_texts) if new_texts[n] != old_texts[n]),
        schema_changed=previous is not None and previous.schema_text != new.schema_text,
    )


def publish_policy_set(
    session: Session,
    texts: Mapping[str, str],
    actor: str,
    *,
    schema: str | None = None,
    note: str = "",
) -> PolicyChange:
    """Validate ``texts`` (file name -> Cedar text) and publish them as the next version.

    ``schema``: the schema text; default the active version's. Raises ``PolicyLoadError``
    (code ``policy.invalid``, naming the file and line) without storing anything if the
    set does not validate. Publishing the set that is already active stores nothing and
    returns ``changed=False``.
    """
    previous = active_version(session, lock=True)
    if schema is None:
        if previous is None:
            raise DomainError(
                "the first policy set must be published with its schema", code="policy.invalid"
            )
        schema = previous.schema_text
    engine = PolicyEngine.load(dict(texts), schema)
    if previous is not None and previous.policy_set_hash == engine.policy_set_hash:
        return _change(previous, previous, changed=False)
    latest = session.scalar(select(func.max(PolicyVersion.version))) or 0
    if previous is not None:
        previous.active = False
    row = PolicyVersion(
        version=latest + 1,
        policy_set_hash=engine.policy_set_hash,
        policies=dict(sorted(texts.items())),
        schema_text=schema,
        published_by=actor,
        published_at=utcnow(),
        note=note,
        active=True,
        activated_by=actor,
        activated_at=utcnow(),
    )
    session.add(row)
    session.flush()
    _ENGINE_CACHE.setdefault(engine.policy_set_hash, engine)
    return _change(row, previous, changed=True)


def activate_version(session: Session, version: int, actor: str) -> PolicyChange:
    """Roll back (or forward) to a stored version: it becomes active again, re-validated.

    ``actor`` is who did it (record it in the audit entry with the returned change).
    """
    previous = active_version(session, lock=True)
    row = get_version(session, version)
    engine_for(row)  # refuse a stored set that no longer validates
    if previous is not None and previous.id == row.id:
        return _change(row, previous, changed=False)
    if previous is not None:
        previous.active = False
    row.active = True
    row.activated_by = actor
    row.activated_at = utcnow()
    session.flush()
    return _change(row, previous, changed=True)


def startup_engine(session: Session, policies_dir: Path, actor: str = "system") -> PolicyEngine:
    """At server start: seed version 1 from ``policies_dir`` if none is published, then
    load and validate the active version.

    Raises ``PolicyLoadError`` (its message names the file, line and the validator's
    message): the server must refuse to start on it. The caller commits the session
    (and records the seed in the audit log when a version was created).
    """
    version = active_version(session)
    if version is None:
        # Validate from the files first, so an error names the file's path.
        PolicyEngine.load(policies_dir / "consortium", policies_dir / SCHEMA_FILENAME)
        texts, schema = read_policy_directory(policies_dir)
        change = publish_policy_set(
            session, texts, actor, schema=schema, note="seeded at first start"
        )
        version = change.version
    return engine_for(version)
