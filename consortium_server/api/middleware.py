"""ASGI middleware: request ids, body size limits, metrics and access logs."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consortium_server.api.errors import DATABASE_RETRY_AFTER_S
from consortium_server.errors import CATALOGUE, DomainError
from consortium_server.logs import request_id_var

__all__ = ["Authenticate", "HttpMetrics", "LargerLimit", "RequestContextMiddleware"]

log = logging.getLogger("concord.http")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,128}$")


class HttpMetrics:
    """Prometheus metrics of the HTTP edge, on a registry owned by one app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "concord_http_requests",
            "HTTP requests handled.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "concord_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            registry=registry,
        )


class _BodyTooLargeError(DomainError):
    """Raised from ``receive`` when a streamed body passes the limit (handled as 413)."""

    code = "request.too_large"


def _error_body(code: str, request_id: str, message: str | None = None) -> bytes:
    entry = CATALOGUE[code]
    return json.dumps(
        {
            "error": {
                "code": code,
                "message": message or entry.title,
                "details": [],
                "request_id": request_id,
            }
        }
    ).encode()


#: Checks a request's credentials from its headers alone (raises a :class:`DomainError`).
Authenticate = Callable[[Request], None]


@dataclass(frozen=True)
class LargerLimit:
    """A route allowed a body above the default limit, and how its caller is authenticated
    before a byte of that body is read: an anonymous client must not make the server read
    and parse megabytes (the route's own dependencies run only after the body is parsed)."""

    pattern: re.Pattern[str]
    limit: int
    authenticate: Authenticate


class RequestContextMiddleware:
    """Gives every request an id (``X-Request-ID``), caps its body, and measures it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: HttpMetrics,
        larger_limits: Sequence[LargerLimit] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.larger_limits = tuple(larger_limits)

    def _larger(self, path: str) -> LargerLimit | None:
        return next((entry for entry in self.larger_limits if entry.pattern.fullmatch(path)), None)

    def limit_for(self, path: str) -> int:
        """The body limit for ``path``: the default, or a larger one for routes that need it."""
        entry = self._larger(path)
        return entry.limit if entry is not None else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        offered = headers.get("x-request-id", "")
        request_id = offered if _VALID_REQUEST_ID.match(offered) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_code = 500
        limit = self.limit_for(scope["path"])

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status_code, started_response
            if message["type"] == "http.response.start":
                status_code = message["status"]
                started_response = True
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLargeError(
                        f"The request body exceeds the limit of {limit} bytes."
                    )
            return message

        larger = self._larger(scope["path"])
        try:
            declared = headers.get("content-length")
            refusal = self._authenticate(larger, scope) if larger is not None else None
            if refusal is not None:
                status_code_, body, extra = refusal
                await self._send_error(send_with_id, status_code_, body, extra)
            elif declared is not None and declared.isdigit() and int(declared) > limit:
                await self._reject_too_large(send_with_id, request_id, limit)
            else:
                try:
                    await self.app(scope, limited_receive, send_with_id)
                except _BodyTooLargeError:
                    await self._reject_too_large(send_with_id, request_id, limit)
                except Exception as exc:
                    # An unhandled error: answered here, inside the request's context, so
                    # that the 500 carries the request id in its body, its header and the
                    # log line (Starlette's outermost handler runs after the id is gone).
                    log.error("unhandled error", exc_info=exc)
                    if started_response:
                        raise
                    await self._send_error(send_with_id, 500, _error_body("internal", request_id))
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status_code)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "route": route,
                    "status": status_code,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            request_id_var.reset(token)

    @staticmethod
    def _authenticate(
        larger: LargerLimit, scope: Scope
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """Run the route's credential check before its body is read: None when it passes,
        else the error response (status, body, extra headers) to send instead. The check
        may read the database (a site's revocation): a database that is busy or down is a
        503 with ``Retry-After``, as on every other route, never a 500."""
        try:
            larger.authenticate(Request(scope))
        except DomainError as exc:
            entry = CATALOGUE[exc.code]
            return (
                entry.status,
                _error_body(
                    exc.code, request_id_var.get() or "", exc.public_message() or entry.title
                ),
                [],
            )
        except (OperationalError, InterfaceError) as exc:
            log.error("database unavailable", extra={"detail": str(exc)[:200]})
            body = _error_body(
                "service.unavailable",
                request_id_var.get() or "",
                "The database is unavailable; try again shortly.",
            )
            return 503, body, [(b"retry-after", str(DATABASE_RETRY_AFTER_S).encode())]
        return None

    async def _reject_too_large(self, send: Send, request_id: str, limit: int) -> None:
        body = _error_body(
            "request.too_large",
            request_id,
            f"The request body exceeds the limit of {limit} bytes.",
        )
        await self._send_error(send, 413, body)

    @staticmethod
    async def _send_error(
        send: Send, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _route_template(scope: Scope) -> str:
    """The matched route's path template (never raw paths: ids would explode cardinality)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
