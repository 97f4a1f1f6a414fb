"""A small typed Python client of the consortium API (httpx), used by the CLIs.

    from concord_protocol.client import ConsortiumClient
    with ConsortiumClient("http://127.0.0.1:8600", token) as api:
        for dataset in api.list_datasets():
            print(dataset["id"])

Errors come back as :class:`ApiError` with the server's stable code and message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import httpx

from concord_protocol.audit.export import AuditExport, join_pages
from concord_protocol.errors import ApiError
from concord_protocol.site_decisions import SignedDecision

__all__ = ["ApiError", "ConsortiumClient", "TokenProvider"]

TokenProvider = Callable[[], str]

#: The longest wait between two tries of a request the server could not serve.
_MAX_RETRY_DELAY_S = 8.0


def _retry_delay(response: httpx.Response) -> float | None:
    """Seconds to wait before resending, or None when the answer is not worth resending."""
    if response.status_code != 503 or "Retry-After" not in response.headers:
        return None
    try:
        body = response.json()
        if body["error"]["code"] != "service.unavailable":
            return None
    except (ValueError, KeyError, TypeError):
        return None
    try:
        seconds = float(response.headers["Retry-After"])
    except ValueError:  # an HTTP date, or garbage: wait the usual second
        seconds = 1.0
    return max(0.0, min(seconds, _MAX_RETRY_DELAY_S)) if math.isfinite(seconds) else 1.0


class ConsortiumClient:
    """Calls ``/api/v1`` with a bearer token (a string, or a callable that renews it).

    ``retries``: how many times a ``503 service.unavailable`` answer is resent (see
    :meth:`_send`); 0 turns resending off.
    """

    def __init__(
        self,
        base_url: str,
        token: str | TokenProvider | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._token = token
        self._retries = max(0, retries)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            return {}
        token = self._token() if callable(self._token) else self._token
        return {"Authorization": f"Bearer {token}"}

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; a non-2xx answer (or none) raises :class:`ApiError`.

        A ``503 service.unavailable`` carrying ``Retry-After`` is sent again, up to
        ``retries`` times: the server gives that answer only after rolling the request's
        transaction back (the database was busy or down), so resending cannot apply it twice.
        """
        for attempt in range(self._retries + 1):
            try:
                response = self._http.request(method, path, headers=self._headers(), **kwargs)
            except httpx.TransportError as exc:
                raise ApiError(
                    f"cannot reach {self._http.base_url}: {exc}", code="connection"
                ) from exc
            if response.is_success:
                return response
            delay = _retry_delay(response)
            if delay is None or attempt == self._retries:
                break
            self._sleep(min(delay * (2**attempt), _MAX_RETRY_DELAY_S))
        try:
            error = response.json()["error"]
            code, message = str(error.get("code", "http")), str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ApiError(response.text[:500], status=response.status_code) from None
        raise ApiError(
            message,
            code=code,
            status=response.status_code,
            details=error.get("details") or (),
            request_id=error.get("request_id"),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return the decoded JSON body (raises :class:`ApiError`)."""
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def download(self, path: str, **kwargs: Any) -> bytes:
        """GET a binary resource (a PDF, a model); raises :class:`ApiError` like ``request``."""
        return self._send("GET", path, **kwargs).content

    # -- identity -------------------------------------------------------------------------

    def audit_export(self, *, on_page: Callable[[int, int], None] | None = None) -> AuditExport:
        """The whole audit log as one export, page by page (``on_page(entries so far,
        next start or -1)`` after each page, for progress)."""
        pages: list[AuditExport] = []
        start: int | None = 0
        while start is not None:
            page = AuditExport.model_validate(
                self.request("GET", "/api/v1/audit/export", params={"start": start})
            )
            pages.append(page)
            # Pages must advance and hold entries (a damaged log with holes still exports,
            # for the verifier to report; a server that never ends does not).
            if page.next_start is not None and (page.next_start <= start or not page.entries):
                raise ValueError(f"the server's export pages do not advance past {start}")
            start = page.next_start
            if on_page is not None:
                on_page(sum(len(p.entries) for p in pages), -1 if start is None else start)
        return join_pages(pages)

    def me(self) -> dict[str, Any]:
        """Who the server thinks you are."""
        result: dict[str, Any] = self.request("GET", "/api/v1/me")
        return result

    # -- sites and catalogue --------------------------------------------------------------

    def enrol_site(self, body: dict[str, Any]) -> dict[str, Any]:
        """Enrol a site (consortium admin)."""
        result: dict[str, Any] = self.request("POST", "/api/v1/sites", json=body)
        return result

    def list_sites(self) -> list[dict[str, Any]]:
        """Every enrolled site."""
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/sites")
        return result

    def publish_dataset(self, body: dict[str, Any]) -> dict[str, Any]:
        """Publish a dataset's metadata for your site."""
        result: dict[str, Any] = self.request("POST", "/api/v1/datasets", json=body)
        return result

    def list_datasets(
        self, *, site_id: str | None = None, purpose: str | None = None
    ) -> list[dict[str, Any]]:
        """The catalogue."""
        params = {k: v for k, v in {"site_id": site_id, "purpose": purpose}.items() if v}
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/datasets", params=params)
        return result

    # -- studies --------------------------------------------------------------------------

    def submit_study(self, contract: dict[str, Any]) -> dict[str, Any]:
        """Submit a study contract."""
        result: dict[str, Any] = self.request("POST", "/api/v1/studies", json=contract)
        return result

    def get_study(self, study_id: str) -> dict[str, Any]:
        """A study with its approvals and history."""
        result: dict[str, Any] = self.request("GET", f"/api/v1/studies/{study_id}")
        return result

    def list_studies(self, *, state: str | None = None) -> list[dict[str, Any]]:
        """Studies visible to you."""
        params = {"state": state} if state else {}
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/studies", params=params)
        return result

    def decide(self, signed: SignedDecision) -> dict[str, Any]:
        """Post a site's signed decision on a study (``site-node study approve`` signs it)."""
        d = signed.decision
        body = {
            "site_id": d.site_id,
            "contract_hash": d.contract_hash,
            "decision": d.decision,
            "reason": d.reason,
            "decided_at": d.decided_at,
            "signature": signed.model_dump(mode="json")["signature"],
        }
        result: dict[str, Any] = self.request(
            "POST", f"/api/v1/studies/{d.study_id}/approvals", json=body
        )
        return result

    def abort_study(self, study_id: str, reason: str) -> dict[str, Any]:
        """Stop a study."""
        result: dict[str, Any] = self.request(
            "POST", f"/api/v1/studies/{study_id}/abort", json={"reason": reason}
        )
        return result
