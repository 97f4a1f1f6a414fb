"""The OpenAPI description as clients meet the API: the bearer scheme, and the error
responses every operation can give.

FastAPI lists only 2xx and its own 422 shape. Concord answers every refusal with
:class:`consortium_server.schemas.ErrorResponse` (a stable ``code`` and the ``request_id``),
so :func:`install_openapi` documents, per operation: ``security: bearer`` (all but the
health probes), 401 and 403 where a token is needed, 404 where the path names something,
409 and 413 where a body is sent, 422 (validation, in Concord's shape), 500 and 503, each
with the error schema. The generated document is
what the schemathesis run in CI fuzzes (``tests/integration/api/test_schemathesis.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from consortium_server.schemas import ErrorResponse

__all__ = ["PUBLIC_PATHS", "install_openapi"]

#: Operations that need no token (the health probes).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})

_BEARER = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "JWT",
    "description": "An OpenID Connect access token from the consortium's Keycloak realm (or "
    "the built-in issuer in development), with the `concord-api` audience. The internal "
    "federation routes take the ServerApp's run token instead.",
}

_ERRORS = {
    "401": "No bearer token, or one that does not verify (`auth.*`).",
    "403": "The token's roles or organisation do not allow this (`auth.forbidden`, "
    "`auth.site_revoked`).",
    "404": "Nothing with that id, or nothing this caller may see (`*.not_found`).",
    "409": "The request conflicts with the current state (`*.conflict`, `study.*`).",
    "413": "The body is larger than the server accepts (`request.too_large`).",
    "422": "The request is malformed or breaks a rule (`request.invalid`, `*.invalid`).",
    "500": "An unexpected server error; quote the `request_id` when you report it.",
    "503": "A dependency (the database, the SuperLink) does not answer; retry later.",
}


def _errors_for(path: str, method: str, public: bool) -> list[str]:
    codes = ["422", "500", "503"]
    if not public:
        codes += ["401", "403"]
    if "{" in path:
        codes.append("404")
    if method in {"post", "put", "patch"}:
        codes += ["409", "413"]
    return sorted(codes)


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the documented description (built once, cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error.pop("$defs", {}))
        schemas["ErrorResponse"] = error
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        components["securitySchemes"] = {"bearer": _BEARER}
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in schema.get("paths", {}).items():
            public = path in PUBLIC_PATHS
            for method, operation in operations.items():
                if not public:
                    operation["security"] = [{"bearer": []}]
                responses = operation.setdefault("responses", {})
                for code in _errors_for(path, method, public):
                    described = responses.setdefault(code, {})
                    described["description"] = described.get("description") or _ERRORS[code]
                    if code == "422" or "content" not in described:
                        described["content"] = ref
                    if code == "422":
                        described["description"] = _ERRORS[code]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
