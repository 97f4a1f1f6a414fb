"""A write is acknowledged only once it is committed: a commit that fails is an error
response, and the object is not there afterwards (found by the PostgreSQL restart drill)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from concord_protocol.client import ConsortiumClient
from tests.support.world import People, dataset_body


def test_a_failed_commit_is_never_acknowledged(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    with monkeypatch.context() as patch:
        patch.setattr(Session, "commit", refuse)
        response = client.post(
            "/api/v1/datasets",
            json=dataset_body("bc-lost", "hospital-a"),
            headers=consortium.steward("a"),
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service.unavailable"
    assert response.headers["Retry-After"] == "1"  # rolled back: safe to send again
    after = client.get("/api/v1/datasets/bc-lost", headers=consortium.researcher)
    assert after.status_code == 404


def test_the_client_resends_a_write_whose_commit_failed_and_it_lands_once(
    client: TestClient, consortium: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = Session.commit
    failures = [OperationalError("COMMIT", {}, Exception("database is locked"))]

    def flaky(self: Session) -> None:
        if failures:
            raise failures.pop()
        real_commit(self)

    token = consortium.steward("a")["Authorization"].removeprefix("Bearer ")
    waits: list[float] = []
    api = ConsortiumClient(
        "http://testserver", token, transport=client._transport, sleep=waits.append
    )
    with monkeypatch.context() as patch:
        patch.setattr(Session, "commit", flaky)
        api.request("POST", "/api/v1/datasets", json=dataset_body("bc-again", "hospital-a"))
    assert waits == [1.0]
    listed = client.get("/api/v1/datasets", headers=consortium.researcher).json()
    assert [d["id"] for d in listed].count("bc-again") == 1
