"""A write is acknowledged only once it is committed: a commit that fails is an error
response, and the object is not there afterwards (found by the PostgreSQL restart drill)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

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
    after = client.get("/api/v1/datasets/bc-lost", headers=consortium.researcher)
    assert after.status_code == 404
