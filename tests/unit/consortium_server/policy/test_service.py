"""Policy versions: publish validates first, versions increase, rollback, seeding at start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from concord_protocol.errors import PolicyLoadError
from consortium_server.db.session import make_sessionmaker, session_scope
from consortium_server.policy.models import PolicyVersion
from consortium_server.policy.service import (
    activate_version,
    active_engine,
    list_versions,
    publish_policy_set,
    read_policy_directory,
    startup_engine,
)
from tests.unit.concord_protocol.policy.conftest import POLICIES


def test_publish_versions_and_rollback(db_engine: Engine) -> None:
    factory = make_sessionmaker(db_engine)
    texts, schema = read_policy_directory(POLICIES)
    with session_scope(factory) as session:
        first = publish_policy_set(session, texts, "op-1", schema=schema)
        assert (first.version.version, first.changed, first.previous_version) == (1, True, None)
        assert first.added == sorted(texts)
    tightened = dict(texts)
    tightened["sites.cedar"] = texts["sites.cedar"].replace("< 3", "< 4")
    del tightened["reports.cedar"]
    with session_scope(factory) as session:
        second = publish_policy_set(session, tightened, "op-2", note="four sites")
        assert second.version.version == 2
        assert (second.modified, second.removed, second.added) == (
            ["sites.cedar"],
            ["reports.cedar"],
            [],
        )
        assert second.previous_hash == first.version.policy_set_hash
        assert second.audit_details()["published_by"] == "op-2"
        assert active_engine(session).policy_set_hash == second.version.policy_set_hash
    with session_scope(factory) as session:
        again = publish_policy_set(session, tightened, "op-3")
        assert not again.changed
        assert again.version.version == 2
    with session_scope(factory) as session:
        rollback = activate_version(session, 1, "op-4")
        assert rollback.changed
        assert rollback.version.activated_by == "op-4"
        assert active_engine(session).policy_set_hash == first.version.policy_set_hash
        versions = list_versions(session)
        assert [(v.version, v.active) for v in versions] == [(2, False), (1, True)]


def test_an_invalid_set_is_not_stored(db_engine: Engine) -> None:
    factory = make_sessionmaker(db_engine)
    texts, schema = read_policy_directory(POLICIES)
    with session_scope(factory) as session:
        publish_policy_set(session, texts, "op", schema=schema)
    broken = {**texts, "models.cedar": texts["models.cedar"].replace("contains(", "containz(")}
    with session_scope(factory) as session:
        with pytest.raises(PolicyLoadError) as caught:
            publish_policy_set(session, broken, "op")
        assert caught.value.file == "models.cedar"
        assert session.scalar(select(func.count()).select_from(PolicyVersion)) == 1


def test_startup_seeds_once_and_refuses_an_invalid_directory(
    db_engine: Engine, tmp_path: Path
) -> None:
    factory = make_sessionmaker(db_engine)
    broken_dir = tmp_path / "policies"
    shutil.copytree(POLICIES, broken_dir)
    bad = broken_dir / "consortium" / "ethics.cedar"
    bad.write_text(bad.read_text().replace("ethics_reference_well_formed", "ethics_ok"))
    with session_scope(factory) as session, pytest.raises(PolicyLoadError) as caught:
        startup_engine(session, broken_dir)
    assert str(caught.value).startswith(f"{bad}, line ")
    assert "ethics_ok" in str(caught.value)
    with session_scope(factory) as session:
        engine = startup_engine(session, POLICIES)
        assert list_versions(session)[0].published_by == "system"
    with session_scope(factory) as session:
        assert startup_engine(session, broken_dir).policy_set_hash == engine.policy_set_hash
        assert len(list_versions(session)) == 1
