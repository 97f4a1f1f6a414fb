"""The API client: errors keep the server's code and request id; a request the database
could not serve (503 ``service.unavailable`` with ``Retry-After``) is sent again."""

from __future__ import annotations

import httpx
import pytest

from concord_protocol.client import ConsortiumClient
from concord_protocol.errors import ApiError


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": code, "details": [], "request_id": "req-1"}}
    return httpx.Response(status, json=body, headers=headers)


class Script(httpx.BaseTransport):
    """Answers requests from a list, then ``{"ok": true}``; counts what was sent."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, bytes]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.read()))
        return self.answers.pop(0) if self.answers else httpx.Response(200, json={"ok": True})


def _client(transport: Script, **kw: object) -> tuple[ConsortiumClient, list[float]]:
    waits: list[float] = []
    client = ConsortiumClient(
        "http://testserver",
        "t",
        transport=transport,
        sleep=waits.append,
        **kw,  # type: ignore[arg-type]
    )
    return client, waits


BUSY = {"Retry-After": "1"}


def test_a_busy_database_answer_is_resent_with_growing_waits_and_the_same_body() -> None:
    transport = Script(
        _error(503, "service.unavailable", BUSY), _error(503, "service.unavailable", BUSY)
    )
    client, waits = _client(transport)
    assert client.request("POST", "/api/v1/x", json={"n": 1}) == {"ok": True}
    assert waits == [1.0, 2.0]
    assert [m for m, _ in transport.sent] == ["POST"] * 3
    assert len({body for _, body in transport.sent}) == 1


def test_resending_stops_after_the_retries_and_raises_the_servers_error() -> None:
    transport = Script(*[_error(503, "service.unavailable", BUSY) for _ in range(5)])
    client, waits = _client(transport, retries=2)
    with pytest.raises(ApiError) as caught:
        client.request("GET", "/api/v1/x")
    assert (caught.value.code, caught.value.status, caught.value.request_id) == (
        "service.unavailable",
        503,
        "req-1",
    )
    assert len(transport.sent) == 3
    assert waits == [1.0, 2.0]


@pytest.mark.parametrize(
    "answer",
    [
        _error(503, "service.unavailable"),  # no Retry-After: not a rolled-back transaction
        _error(503, "auth.issuer_unavailable", BUSY),  # another code
        _error(500, "internal", BUSY),
        _error(409, "resource.conflict", BUSY),
        httpx.Response(503, text="<html>proxy</html>", headers=BUSY),  # not our error body
    ],
)
def test_other_failures_are_not_resent(answer: httpx.Response) -> None:
    transport = Script(answer)
    client, waits = _client(transport)
    with pytest.raises(ApiError):
        client.request("POST", "/api/v1/x", json={})
    assert len(transport.sent) == 1
    assert waits == []


def test_a_hostile_retry_after_cannot_stall_the_client() -> None:
    transport = Script(
        _error(503, "service.unavailable", {"Retry-After": "86400"}),
        _error(503, "service.unavailable", {"Retry-After": "-5"}),
        _error(503, "service.unavailable", {"Retry-After": "nan"}),
    )
    client, waits = _client(transport)
    assert client.request("GET", "/api/v1/x") == {"ok": True}
    assert waits == [8.0, 0.0, 4.0]  # capped; never negative; unreadable counts as 1 s
