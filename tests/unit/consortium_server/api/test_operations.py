"""Operations and the HTTP edge: health, readiness, metrics, request ids, limits, errors."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.identity.local_issuer import LocalIssuer
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.world import People, study_contract


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"


def test_readyz_reports_an_unreachable_database(tmp_path: Any) -> None:
    settings = ServerSettings(
        data_dir=tmp_path,
        database={  # type: ignore[arg-type]
            "url": "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1",
            "auto_migrate": False,
        },
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert client.get("/healthz").status_code == 200


def test_metrics_count_requests_by_route_template(client: TestClient, people: People) -> None:
    client.get("/api/v1/studies/does-not-exist", headers=people.admin)
    text = client.get("/metrics").text
    sample = 'concord_http_requests_total{method="GET",route="/api/v1/studies/{study_id}"'
    assert f'{sample},status="404"}} 1.0' in text
    assert "does-not-exist" not in text


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    offered = client.get("/healthz", headers={"X-Request-ID": "trace-1234abcd"})
    assert offered.headers["x-request-id"] == "trace-1234abcd"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert generated.headers["x-request-id"] != "bad id with spaces"
    assert len(generated.headers["x-request-id"]) == 32


def test_error_body_carries_the_request_id(client: TestClient) -> None:
    response = client.get("/api/v1/studies", headers={"X-Request-ID": "trace-abcdef12"})
    assert response.status_code == 401
    assert response.json()["error"]["request_id"] == "trace-abcdef12"
    assert response.headers["www-authenticate"] == "Bearer"


def test_oversized_body_is_refused_before_parsing(client: TestClient, people: People) -> None:
    contract = study_contract(["bc-a"], description="x" * 5000)
    contract["title"] = "t" * 100
    big = {"padding": "y" * (70 * 1024), **contract}
    response = client.post("/api/v1/studies", json=big, headers=people.researcher)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request.too_large"


def test_oversized_streamed_body_is_refused(client: TestClient, people: People) -> None:
    def chunks() -> Any:
        for _ in range(20):
            yield b"x" * 8192

    response = client.post(
        "/api/v1/studies",
        content=chunks(),
        headers={**people.researcher, "content-type": "application/json"},
    )
    assert response.status_code == 413


def test_unexpected_errors_hide_the_stack_trace(app: FastAPI, client: TestClient) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    from consortium_server.api import middleware
    from consortium_server.logs import RequestJsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RequestJsonFormatter())
    middleware.log.addHandler(handler)
    try:
        with TestClient(app, raise_server_exceptions=False) as raw:
            response = raw.get("/boom", headers={"X-Request-ID": "trace-boom-500"})
    finally:
        middleware.log.removeHandler(handler)
    logged = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(
        e["message"] == "unhandled error" and e["request_id"] == "trace-boom-500" for e in logged
    )
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["code"] == "internal"
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    # The request id is in the body and the header of a 500 too, as on every error.
    assert body["error"]["request_id"] == "trace-boom-500"
    assert response.headers["x-request-id"] == "trace-boom-500"


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "resource.not_found"


def test_a_wrong_method_is_a_405_that_says_which_are_allowed(client: TestClient) -> None:
    response = client.delete("/api/v1/studies", headers={"X-Request-ID": "trace-405-allow"})
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    assert response.json()["error"]["request_id"] == "trace-405-allow"
    one = client.put("/api/v1/studies/some-id/approvals")
    assert one.status_code == 405
    assert one.headers["allow"] == "POST"  # the path template matched, its one method


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ("Bearer", "auth.invalid_token"),
        ("Basic dXNlcjpwYXNz", "auth.invalid_token"),
        ("Bearer not.a.jwt", "auth.invalid_token"),
    ],
)
def test_malformed_authorization_is_401(client: TestClient, header: str, code: str) -> None:
    response = client.get("/api/v1/me", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == code


def _mint(issuer: LocalIssuer, **claims: Any) -> dict[str, str]:
    defaults: dict[str, Any] = {
        "subject": "rita",
        "roles": ["researcher"],
        "organisation": "Uni",
        "audience": "concord-api",
    }
    return {"Authorization": f"Bearer {issuer.mint(**{**defaults, **claims})}"}


def test_tampered_expired_and_foreign_tokens_are_401(
    app: FastAPI, client: TestClient, tmp_path: Any
) -> None:
    issuer: LocalIssuer = app.state.local_issuer
    good = _mint(issuer)
    assert client.get("/api/v1/me", headers=good).status_code == 200

    token = good["Authorization"].removeprefix("Bearer ")
    header, payload, signature = token.split(".")
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    tampered = client.get(
        "/api/v1/me", headers={"Authorization": f"Bearer {header}.{payload}.{flipped}"}
    )
    assert tampered.status_code == 401
    assert tampered.json()["error"]["code"] == "auth.invalid_token"

    expired = client.get("/api/v1/me", headers=_mint(issuer, now=int(time.time()) - 7200))
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "auth.expired_token"

    stranger = LocalIssuer.load_or_create(tmp_path / "other.pem", "http://evil.example/realms/x")
    foreign = client.get("/api/v1/me", headers=_mint(stranger))
    assert foreign.status_code == 401

    wrong_audience = client.get("/api/v1/me", headers=_mint(issuer, audience="another-api"))
    assert wrong_audience.status_code == 401
    assert "audience" in wrong_audience.json()["error"]["message"]


def test_openapi_documents_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for path in (
        "/api/v1/studies",
        "/api/v1/studies/{study_id}",
        "/api/v1/studies/{study_id}/approvals",
        "/api/v1/studies/{study_id}/abort",
        "/api/v1/datasets",
        "/api/v1/sites",
        "/api/v1/me",
        "/healthz",
        "/readyz",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_local_issuer_serves_its_keys(app: FastAPI, client: TestClient) -> None:
    jwks = client.get("/realms/local/protocol/openid-connect/certs").json()
    assert jwks["keys"][0]["kid"] == app.state.local_issuer.kid
    assert "d" not in jwks["keys"][0]
    config = client.get("/realms/local/.well-known/openid-configuration").json()
    assert config["issuer"].endswith("/realms/local")
    assert client.get("/realms/other/protocol/openid-connect/certs").status_code == 404
    # The token endpoint it advertises answers, as OAuth says it should (RFC 6749 5.2).
    assert config["token_endpoint"].endswith("/realms/local/protocol/openid-connect/token")
    token = client.post(
        "/realms/local/protocol/openid-connect/token",
        data={"grant_type": "client_credentials", "client_id": "x", "client_secret": "y"},
    )
    assert token.status_code == 400
    assert token.json()["error"] == "unsupported_grant_type"
    assert token.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/audit/entries/{2**70}",
        "/api/v1/audit/entries/-1",
        f"/api/v1/audit/entries/0?tree_size={2**64}",
        f"/api/v1/audit/consistency?first={2**63}",
        f"/api/v1/audit/consistency?first=1&second={2**80}",
    ],
    ids=["huge-index", "negative-index", "huge-tree-size", "huge-first", "huge-second"],
)
def test_numbers_beyond_any_log_are_a_422_with_the_request_id(
    client: TestClient, people: People, path: str
) -> None:
    """Integers no database column holds (SQLite's are 64-bit) never reach the database."""
    response = client.get(path, headers={**people.compliance, "X-Request-ID": "trace-big-num"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["request_id"] == "trace-big-num"
    assert error["code"] == "request.invalid"


def test_a_huge_policy_version_is_a_422(client: TestClient, people: People) -> None:
    response = client.post(f"/api/v1/policy/versions/{2**64}/activate", headers=people.admin)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["request_id"]


def _raw_post(client: TestClient, app: FastAPI, path: str, headers: list[tuple[bytes, bytes]]):  # type: ignore[no-untyped-def]
    """POST a 50 MB body straight to the ASGI app, counting how much of it was read."""
    chunk = b"x" * 1_048_576
    reads: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        reads.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(reads) < 50}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(50 * len(chunk)).encode()),
            *headers,
        ],
        "client": ("192.0.2.50", 40000),
        "server": ("testserver", 80),
    }
    assert client.portal is not None
    client.portal.call(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), sum(reads)


@pytest.mark.parametrize(
    ("path", "authorization"),
    [
        ("/api/v1/studies/some-study/keys", None),
        ("/api/v1/studies/some-study/keys", b"Bearer not.a.token"),
        ("/api/v1/studies/some-study/release/model", b"Bearer forged"),
        ("/internal/v1/federation/studies/s/runs/" + "0" * 32 + "/rounds/1/checkpoint", None),
    ],
    ids=["keys-no-token", "keys-bad-token", "model-bad-token", "checkpoint-no-token"],
)
def test_a_large_body_from_an_unauthenticated_caller_is_refused_before_it_is_read(
    client: TestClient, app: FastAPI, path: str, authorization: bytes | None
) -> None:
    """The routes that take large bodies authenticate the caller first: 50 MB from someone
    without valid credentials is refused having read none of it."""
    headers = [(b"authorization", authorization)] if authorization else []
    status, body, read = _raw_post(client, app, path, headers)
    assert status in (401, 404)  # 404: the checkpoint route with runs disabled here
    assert body["error"]["code"] in (
        "auth.missing_token",
        "auth.invalid_token",
        "federation.disabled",
    )
    assert body["error"]["request_id"]
    assert read == 0


def test_a_busy_database_during_the_pre_body_check_is_a_503_not_a_500(
    client: TestClient, app: FastAPI, consortium: People, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model upload checks a node's site before reading its body; with the database
    locked (SQLite under a large release) that check fails: the caller gets a 503 it may
    retry (Retry-After), with the request id, and nothing of the body was read."""
    from sqlalchemy.exc import OperationalError

    from consortium_server.api import deps

    def locked(*_: object) -> None:
        raise OperationalError("SELECT status FROM sites", {}, Exception("database is locked"))

    monkeypatch.setattr(deps, "_refuse_revoked_site", locked)
    token = consortium.node("a")["Authorization"].encode()
    chunk = b"x" * 1_048_576
    sent: list[dict[str, Any]] = []
    reads: list[int] = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": chunk, "more_body": len(reads) < 50}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    path = "/api/v1/studies/some-study/release/model"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(50 * len(chunk)).encode()),
            (b"authorization", token),
        ],
        "client": ("192.0.2.50", 40000),
        "server": ("testserver", 80),
    }
    assert client.portal is not None
    client.portal.call(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]
    assert body["error"]["code"] == "service.unavailable"
    assert body["error"]["request_id"]
    assert reads == []
