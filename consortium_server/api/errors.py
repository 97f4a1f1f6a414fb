"""The one translator from errors to HTTP responses."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from concord_protocol.errors import ConcordError
from consortium_server.errors import CATALOGUE, DomainError
from consortium_server.logs import request_id_var

__all__ = ["error_response", "install_error_handlers"]

log = logging.getLogger("concord.errors")

#: Seconds a client should wait before resending a request the database could not serve.
DATABASE_RETRY_AFTER_S = 1


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    *,
    extra_headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """``{"error": {code, message, details, request_id}}`` with ``status``."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    headers.update(extra_headers or {})
    return JSONResponse(
        status_code=status,
        content={
            "error": {
                "code": code,
                "message": message,
                "details": details or [],
                "request_id": request_id_var.get(),
            }
        },
        headers=headers,
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    """A :class:`DomainError`, or an error of the shared protocol code whose code is in the
    catalogue (a policy that does not load, a key that is not a key); any other coded error
    is a bug here and answers 500 like the rest."""
    assert isinstance(exc, ConcordError)
    if not isinstance(exc, DomainError) and exc.code not in CATALOGUE:
        return await _unexpected(_, exc)
    entry = CATALOGUE[exc.code]
    if entry.status >= 500:
        log.warning("domain error", extra={"code": exc.code, "detail": str(exc)})
    message = exc.public_message() if isinstance(exc, DomainError) else exc.message
    return error_response(entry.status, exc.code, message or entry.title, exc.details)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = []
    for error in exc.errors():
        loc = error.get("loc", ())
        details.append(
            {
                "field": _field_path(loc),
                "message": str(error.get("msg", "invalid")),
                "type": str(error.get("type", "")),
            }
        )
    fields = ", ".join(d["field"] for d in details[:10])
    return error_response(422, "request.invalid", f"Invalid request: {fields}.", details)


def _allowed_methods(request: Request) -> str:
    """Every method the API documents at this path, from the app's OpenAPI description
    (Starlette's ``Allow`` names only the first route that matched the path, and FastAPI
    has one route per method)."""
    path = request.url.path
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {m.upper() for m in item if m.lower() in _HTTP_METHODS}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ConcordError):
        # FastAPI wraps errors raised while reading the body (e.g. the size limit).
        return await _domain_error(_, exc.__cause__)
    code = {404: "resource.not_found", 413: "request.too_large"}.get(exc.status_code)
    if code is None:
        code = "request.invalid" if exc.status_code < 500 else "internal"
    message = CATALOGUE[code].title if exc.status_code == 404 else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # RFC 9110 15.5.6: say which methods the resource allows
        headers["Allow"] = _allowed_methods(_) or headers.get("Allow", "")
    return error_response(exc.status_code, code, message, extra_headers=headers)


async def _database_error(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, IntegrityError):
        log.info("integrity error", extra={"detail": str(exc.orig)[:200]})
        return error_response(409, "resource.conflict", CATALOGUE["resource.conflict"].title)
    log.error("database unavailable", extra={"detail": str(exc)[:200]})
    # The transaction was rolled back, so the request changed nothing: a client may send
    # it again (ConsortiumClient does, after Retry-After seconds).
    return error_response(
        503,
        "service.unavailable",
        "The database is unavailable; try again shortly.",
        extra_headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal", CATALOGUE["internal"].title)


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors and anything unexpected to JSON responses."""
    app.add_exception_handler(ConcordError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(IntegrityError, _database_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(InterfaceError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
