"""The ServerApp's side of the round gate: report each round, wait for the verdict.

:class:`ApiRoundGate` talks to the consortium server's internal API
(:mod:`consortium_server.federation.internal_router`) with the federation token. Each call
is retried, with backoff, while the server is down or answers 5xx/429, for up to
``retry_s``; after that the run gives up (:class:`GateUnavailableError`) and the server,
once back, restarts it from its last recorded round. A 4xx answer is final: the verdict is
``stop`` with the server's reason. :meth:`ApiRoundGate.heartbeats` runs a thread that tells
the server this run is alive (every ``heartbeat_s``) and sets :attr:`stop_requested` when
the server says the run must stop (the study was aborted, or this attempt was replaced).

:class:`RoundGate` is what the round loop needs; tests and benchmarks give it other gates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol, Self

import httpx

from concord_protocol.rounds import RoundRecord
from consortium_server.federation.checkpoints import (
    GlobalModel,
    pack_checkpoint,
    unpack_checkpoint,
)
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.run_messages import (
    CHECKPOINT_MEDIA_TYPE,
    RoundReport,
    RunFailure,
    RunVerdict,
)
from consortium_server.federation.serverapp_settings import ServerAppSettings

__all__ = ["ApiRoundGate", "GateUnavailableError", "RoundGate"]

log = logging.getLogger("concord.federation.server")

#: Seconds one call may take (a round report commits the round and checks the policy).
_TIMEOUT_S = 60.0
#: Answers worth another try (the server is restarting, overloaded or its database is down).
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class RoundGate(Protocol):
    """What the round loop asks before each next round."""

    @property
    def stop_requested(self) -> bool:
        """True once the server said the run must stop (checked before every round)."""
        ...

    def report(self, record: RoundRecord, model: GlobalModel | None) -> RunVerdict:
        """Hand over the round (and its aggregate, if it was aggregated); the verdict."""
        ...


class GateUnavailableError(RuntimeError):
    """The consortium server could not be reached for longer than the retry window."""


class ApiRoundGate:
    """The round gate over HTTP (see the module)."""

    def __init__(
        self,
        plan: RunPlan,
        *,
        api_url: str,
        token: str,
        client: httpx.Client | None = None,
        verify: bool | str = True,
        retry_s: float = 900.0,
        heartbeat_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.plan = plan
        self._base = f"/internal/v1/federation/studies/{plan.study_id}/runs/{plan.attempt}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._http = client or httpx.Client(
            base_url=api_url.rstrip("/"), verify=verify, timeout=_TIMEOUT_S
        )
        self._owns_client = client is None
        self._retry_s = retry_s
        self._heartbeat_s = heartbeat_s
        self._sleep = sleep
        self._stop = threading.Event()
        self.stop_reason = ""

    @classmethod
    def from_settings(cls, settings: ServerAppSettings, plan: RunPlan) -> Self:
        """The gate the deployed ServerApp uses."""
        return cls(
            plan,
            api_url=settings.api_url,
            token=settings.token().get_secret_value(),
            verify=str(settings.ca_file) if settings.ca_file else True,
            retry_s=settings.retry_s,
            heartbeat_s=settings.heartbeat_s,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owns_client:
            self._http.close()

    @property
    def stop_requested(self) -> bool:
        """True once the server said the run must stop."""
        return self._stop.is_set()

    # --- plumbing --------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried while the server is unreachable or answers 5xx/429."""
        deadline = time.monotonic() + self._retry_s
        delay = 0.5
        headers = {**self._headers, **kwargs.pop("headers", {})}
        while True:
            try:
                response = self._http.request(method, self._base + path, headers=headers, **kwargs)
                if response.status_code not in _RETRY_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                raise GateUnavailableError(
                    f"the consortium server did not answer {method} {path} for "
                    f"{self._retry_s:.0f}s ({problem})"
                )
            log.warning(
                "consortium server unavailable; retrying",
                extra={"study_id": self.plan.study_id, "call": path, "problem": problem},
            )
            self._sleep(delay)
            delay = min(delay * 2, 10.0)

    def _verdict(self, response: httpx.Response) -> RunVerdict:
        if response.is_success:
            return RunVerdict.model_validate_json(response.content)
        try:
            error = response.json()["error"]
            reason = f"{error.get('code')}: {error.get('message')}"
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {response.status_code}"
        return RunVerdict(action="stop", reason=f"the server refused the run ({reason})")

    def _stopping(self, verdict: RunVerdict) -> RunVerdict:
        if not verdict.goes_on:
            self.stop_reason = verdict.reason
            self._stop.set()
        return verdict

    # --- the gate --------------------------------------------------------------------

    def report(self, record: RoundRecord, model: GlobalModel | None) -> RunVerdict:
        """Upload the aggregate (if any), then report the round; the verdict."""
        if model is not None:
            uploaded = self._verdict(
                self._call(
                    "PUT",
                    f"/rounds/{model.round_number}/checkpoint",
                    params={"total_weight": repr(float(model.total_weight))},
                    content=pack_checkpoint(model),
                    headers={"Content-Type": CHECKPOINT_MEDIA_TYPE},
                )
            )
            if not uploaded.goes_on:
                return self._stopping(uploaded)
        body = RoundReport(record=record).model_dump_json()
        response = self._call(
            "POST", "/rounds", content=body, headers={"Content-Type": "application/json"}
        )
        return self._stopping(self._verdict(response))

    def checkpoint(self, round_number: int) -> GlobalModel:
        """The aggregate of ``round_number`` the server kept (to resume after it)."""
        response = self._call("GET", f"/checkpoints/{round_number}")
        if not response.is_success:
            raise RuntimeError(f"no checkpoint of round {round_number}: {response.text[:300]}")
        manifest, blobs = unpack_checkpoint(response.content)
        return GlobalModel(
            round_number=round_number,
            blobs=tuple(blobs),
            total_weight=float(response.headers["X-Concord-Total-Weight"]),
            digest=response.headers["X-Concord-Digest"],
            manifest=manifest,
        )

    def failure(self, reason: str) -> None:
        """Tell the server this run stopped on an error (best effort, no long retries)."""
        try:
            self._http.post(
                self._base + "/failure",
                content=RunFailure(reason=reason[:4000] or "error").model_dump_json(),
                headers={**self._headers, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            log.warning("could not report the failure", extra={"problem": str(exc)})

    @contextmanager
    def heartbeats(self) -> Iterator[None]:
        """Say every ``heartbeat_s`` that this run is alive, while the block runs."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self._heartbeat_s):
                try:
                    response = self._http.post(self._base + "/heartbeat", headers=self._headers)
                except httpx.HTTPError:
                    continue  # the server is down for a moment; reports retry on their own
                if response.status_code < 500:
                    self._stopping(self._verdict(response))

        thread = threading.Thread(target=beat, name="concord-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=self._heartbeat_s + 11)
