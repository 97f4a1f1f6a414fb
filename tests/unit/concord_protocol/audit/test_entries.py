"""Audit entries: HIPAA fields, canonical encoding, timestamp and actor inside the leaf."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from concord_protocol.audit.entries import Actor, AuditEntry
from concord_protocol.audit.merkle import leaf_hash
from concord_protocol.principals import Principal, Role
from tests.support.audit import make_entry


def test_canonical_bytes_hold_every_reviewer_field() -> None:
    entry = make_entry(7)
    data = entry.canonical_bytes()
    decoded = json.loads(data)
    assert decoded["actor"] == {
        "organisation": "hospital-a",
        "roles": ["data_steward"],
        "subject": "alice",
    }
    assert decoded["at"] == "2025-03-01T12:00:07.000000Z"
    assert decoded["policy"] == {"decision": "allow", "set_hash": "a" * 64}
    assert set(decoded) == {
        "v", "actor", "action", "object", "outcome", "purpose", "policy",
        "contract_hash", "at", "request_id", "source", "details",
    }  # fmt: skip
    # Keys sorted, no whitespace: RFC 8785.
    assert data.startswith(b'{"action":"study.approved","actor":{')
    assert AuditEntry.from_canonical_bytes(data) == entry


def test_timestamp_and_actor_change_the_leaf_hash() -> None:
    entry = make_entry(1)
    later = entry.model_copy(update={"at": entry.at + timedelta(microseconds=1)})
    other_actor = entry.model_copy(update={"actor": Actor(subject="mallory")})
    hashes = {leaf_hash(e.canonical_bytes()) for e in (entry, later, other_actor)}
    assert len(hashes) == 3


def test_timestamps_are_normalised_to_utc_and_naive_ones_refused() -> None:
    plus_two = timezone(timedelta(hours=2))
    entry = make_entry(1).model_copy(update={})
    shifted = AuditEntry.model_validate(
        {**entry.model_dump(), "at": datetime(2025, 3, 1, 14, 0, 1, tzinfo=plus_two)}
    )
    assert json.loads(shifted.canonical_bytes())["at"] == "2025-03-01T12:00:01.000000Z"
    with pytest.raises(ValidationError, match="timezone-aware"):
        AuditEntry.model_validate({**entry.model_dump(), "at": datetime(2025, 3, 1, 12)})


def test_unknown_fields_and_non_json_details_are_refused() -> None:
    data = make_entry(1).model_dump()
    with pytest.raises(ValidationError, match="Extra inputs"):
        AuditEntry.model_validate({**data, "patient_name": "x"})
    with pytest.raises(ValidationError, match="plain JSON"):
        AuditEntry.model_validate({**data, "details": {"x": float("nan")}})
    with pytest.raises(ValidationError):
        AuditEntry.model_validate({**data, "action": "Not An Action"})


def test_non_canonical_bytes_are_refused() -> None:
    data = make_entry(1).canonical_bytes()
    pretty = json.dumps(json.loads(data), indent=1).encode()
    with pytest.raises(ValueError, match="canonical"):
        AuditEntry.from_canonical_bytes(pretty)


def test_actor_from_principal_sorts_roles() -> None:
    principal = Principal(
        subject="sub-1",
        roles=frozenset({Role.SITE_NODE, Role.DATA_STEWARD}),
        organisation="hospital-b",
        issuer="https://issuer",
    )
    actor = Actor.from_principal(principal)
    assert actor == Actor(
        subject="sub-1", organisation="hospital-b", roles=("data_steward", "site_node")
    )
