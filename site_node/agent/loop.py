"""The site agent loop behind ``site-node run``.

Every ``poll_interval_s`` seconds one pass runs five steps, in order:

``peers``
    follow the signed key rotations of pinned peers whose published keys moved; a change
    without a valid rotation from the pinned key is refused (:mod:`site_node.peers`);
``sync``
    follow the studies this site approved itself (``site-node study approve``): re-check the
    served contract, post decisions the server missed, verify the other members' signed
    approvals; revoke approvals (and keys) of studies that were rejected, aborted or failed
    (:mod:`site_node.agent.sync`);
``keys``
    generate or receive each approved, encrypted study's CKKS key
    (:mod:`site_node.agent.key_exchange`); skipped when ``sync`` failed;
``witness``
    cosign the audit log's latest tree head if it extends the last one
    (:mod:`site_node.agent.witness`);
``release``
    sign off the final model of each completed study (and, for one site, upload it), once
    its final round is on record in a head this site witnessed
    (:mod:`site_node.agent.release`); skipped when ``sync`` failed.

Every step is idempotent, so a step that hits a transient error (no answer, 5xx, 429, an
expired token, the identity provider down) is simply run again, up to ``retry_attempts``
times with exponential backoff; a pass whose steps still failed for transient reasons
makes the loop wait longer before the next pass (up to ``max_backoff_s``). Other failures
(a refused contract, a refused head) are logged as errors and the loop goes on at the
normal interval. SIGTERM and SIGINT stop the loop between two steps or during a wait.

Logs are JSON lines on stderr (logger ``concord.site.agent``): an ``event`` name, the
step, counts, study ids, error codes and public key fingerprints; never tokens, client
secrets or key material.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

import httpx

from concord_protocol.client import ApiError, ConsortiumClient, TokenProvider
from concord_protocol.logs import JsonFormatter
from site_node.agent.heartbeat import beat, clear
from site_node.agent.key_exchange import KeyResult, exchange_keys
from site_node.agent.release import ReleaseResult, sign_off_completed
from site_node.agent.sync import AgentError, SyncResult, is_transient, sync_approvals
from site_node.agent.witness import WitnessResult, cosign_latest, verify_latest, witnessed_head
from site_node.crypto.sealing import SiteKeyPair
from site_node.federation.approvals import ApprovalStore
from site_node.peers import FollowResult, PeerStore
from site_node.settings import SiteSettings

__all__ = [
    "LOGGER_NAME",
    "PassReport",
    "SiteAgent",
    "StepOutcome",
    "configure_agent_logging",
    "run_agent",
    "token_provider",
    "verify_audit",
]

LOGGER_NAME = "concord.site.agent"
log = logging.getLogger(LOGGER_NAME)

T = TypeVar("T")


class _StepResult(Protocol):
    def summary(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StepOutcome:
    """How one step of a pass ended."""

    name: str
    ok: bool
    attempts: int
    code: str | None = None
    transient: bool = False


@dataclass
class PassReport:
    """The outcome of every step of one pass."""

    steps: list[StepOutcome] = field(default_factory=list)
    peers: FollowResult | None = None
    sync: SyncResult | None = None
    keys: KeyResult | None = None
    release: ReleaseResult | None = None
    witness: WitnessResult | None = None

    @property
    def ok(self) -> bool:
        """True when every step succeeded."""
        return all(step.ok for step in self.steps)

    @property
    def transient_failure(self) -> bool:
        """True when a step gave up on a transient error (the server may be down)."""
        return any(step.transient for step in self.steps)


def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else type(exc).__name__


def _message(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, ApiError) else str(exc)
    return text[:300]


class SiteAgent:
    """Runs the agent's passes for one site against one consortium API client."""

    def __init__(
        self,
        api: ConsortiumClient,
        *,
        site_id: str,
        site_keys: SiteKeyPair,
        state_dir: Path,
        server_head_key: str | None = None,
        audit_log_id: str | None = None,
        retry_attempts: int = 3,
        retry_base_s: float = 1.0,
        sleep: Callable[[float], object] | None = None,
        on_unauthorized: Callable[[], None] | None = None,
    ) -> None:
        if retry_attempts < 1:
            raise ValueError("retry_attempts must be at least 1")
        self.api = api
        self.site_id = site_id
        self.site_keys = site_keys
        self.state_dir = Path(state_dir)
        self.store = ApprovalStore(self.state_dir)
        self.peers = PeerStore(self.state_dir)
        self.server_head_key = server_head_key
        self.audit_log_id = audit_log_id
        self.retry_attempts = retry_attempts
        self.retry_base_s = retry_base_s
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait
        self._on_unauthorized = on_unauthorized

    # --- control ------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    # --- one pass -----------------------------------------------------------------

    def run_pass(self) -> PassReport:
        """Run peers, sync, keys, witness and release once; never raises for API or domain
        errors."""
        report = PassReport()
        outcome, report.peers = self._step(
            "peers", lambda: self.peers.follow(self.api.list_sites(), self.api)
        )
        report.steps.append(outcome)
        if report.peers is not None:
            self._log_peers(report.peers)
        outcome, report.sync = self._step(
            "sync",
            lambda: sync_approvals(
                self.api, site_id=self.site_id, store=self.store, peers=self.peers.all()
            ),
        )
        report.steps.append(outcome)
        if report.sync is not None:
            self._log_sync(report.sync)
            active = report.sync.active
            outcome, report.keys = self._step(
                "keys",
                lambda: exchange_keys(
                    self.api,
                    site_id=self.site_id,
                    site_keys=self.site_keys,
                    store=self.store,
                    studies=active,
                    peers=self.peers.all(),
                ),
            )
            report.steps.append(outcome)
            if report.keys is not None:
                self._log_keys(report.keys)
        if not self.stopping:
            outcome, report.witness = self._step(
                "witness",
                lambda: cosign_latest(
                    self.api,
                    site_id=self.site_id,
                    signing_key=self.site_keys.signing_key,
                    state_dir=self.state_dir,
                    server_head_key=self.server_head_key,
                    audit_log_id=self.audit_log_id,
                ),
            )
            report.steps.append(outcome)
            if report.witness is not None and report.witness.trusted_on_first_use:
                log.warning(
                    "trusting the consortium's tree-head key on first use",
                    extra={"event": "agent.witness_tofu", "step": "witness"},
                )
        if report.sync is not None and not self.stopping:
            # After the witness: the final round's audit entry must be in a head this site
            # cosigned before it releases (site_node.release.check_on_record).
            outcome, report.release = self._step(
                "release",
                lambda: sign_off_completed(
                    self.api,
                    site_id=self.site_id,
                    site_keys=self.site_keys,
                    store=self.store,
                    witnessed=witnessed_head(self.state_dir),
                ),
            )
            report.steps.append(outcome)
            if report.release is not None and report.release.signed:
                log.info(
                    "release signed off",
                    extra={"event": "agent.release", "step": "release", **report.release.summary()},
                )
        log.log(
            logging.INFO if report.ok else logging.ERROR,
            "agent pass done",
            extra={
                "event": "agent.pass",
                "ok": report.ok,
                "failed_steps": ",".join(s.name for s in report.steps if not s.ok),
            },
        )
        return report

    def _step(self, name: str, run: Callable[[], T]) -> tuple[StepOutcome, T | None]:
        """Run one step, retrying transient errors with exponential backoff."""
        attempt = 0
        while True:
            attempt += 1
            try:
                value = run()
            except Exception as exc:
                transient = is_transient(exc)
                if transient and attempt < self.retry_attempts and not self.stopping:
                    if isinstance(exc, ApiError) and exc.status == 401 and self._on_unauthorized:
                        self._on_unauthorized()
                    delay = self.retry_base_s * 2 ** (attempt - 1)
                    log.warning(
                        "agent step hit a transient error; retrying",
                        extra={
                            "event": "agent.step_retry",
                            "step": name,
                            "attempt": attempt,
                            "code": _code(exc),
                            "error": _message(exc),
                            "retry_in_s": delay,
                        },
                    )
                    self._sleep(delay)
                    continue
                known = isinstance(exc, ApiError) or hasattr(exc, "code")
                log.error(
                    "agent step failed",
                    extra={
                        "event": "agent.step_failed",
                        "step": name,
                        "attempts": attempt,
                        "code": _code(exc),
                        "error": _message(exc),
                        "transient": transient,
                    },
                    exc_info=not known,
                )
                return StepOutcome(name, False, attempt, _code(exc), transient), None
            ok = bool(getattr(value, "ok", True))
            summary: dict[str, Any] = value.summary() if hasattr(value, "summary") else {}
            log.log(
                logging.INFO if ok else logging.ERROR,
                "agent step done",
                extra={"event": "agent.step", "step": name, "ok": ok, "attempts": attempt}
                | summary,
            )
            return StepOutcome(name, ok, attempt, None if ok else "agent.step_incomplete"), value

    def _log_peers(self, result: FollowResult) -> None:
        for site_id, fingerprint in result.rotated.items():
            log.info(
                "pinned peer's keys rotated",
                extra={
                    "event": "agent.peer_rotated",
                    "step": "peers",
                    "site_id": site_id,
                    "key_fingerprint": fingerprint,
                },
            )
        for site_id, code in result.refused.items():
            log.error(
                "a pinned peer's published keys are refused",
                extra={
                    "event": "agent.peer_refused",
                    "step": "peers",
                    "site_id": site_id,
                    "code": code,
                },
            )

    def _log_sync(self, result: SyncResult) -> None:
        for study_id in result.recorded:
            log.info(
                "study decision posted",
                extra={"event": "agent.decision_posted", "study_id": study_id},
            )
        for study_id in result.revoked:
            log.info(
                "study approval revoked",
                extra={"event": "agent.approval_revoked", "study_id": study_id},
            )
        for study_id, code in result.refused.items():
            log.error(
                "study contract refused",
                extra={"event": "agent.study_refused", "study_id": study_id, "code": code},
            )

    def _log_keys(self, result: KeyResult) -> None:
        for kind, ids in (("generated", result.generated), ("received", result.received)):
            for study_id in ids:
                log.info(
                    f"study key {kind}",
                    extra={
                        "event": f"agent.key_{kind}",
                        "study_id": study_id,
                        "key_fingerprint": result.fingerprints.get(study_id, ""),
                    },
                )
        for study_id, code in result.failed.items():
            log.error(
                "study key exchange failed",
                extra={"event": "agent.key_failed", "study_id": study_id, "code": code},
            )

    # --- the loop -----------------------------------------------------------------

    def run_forever(self, *, poll_interval_s: float, max_backoff_s: float = 300.0) -> None:
        """Run passes until :meth:`stop`; back off after passes that failed transiently."""
        failures = 0
        clear(self.state_dir)  # a restarted agent is healthy after its own first pass
        while not self.stopping:
            report = self.run_pass()
            beat(self.state_dir)
            failures = failures + 1 if report.transient_failure else 0
            delay = poll_interval_s
            if failures:
                delay = min(max_backoff_s, poll_interval_s * 2 ** min(failures, 16))
                log.warning(
                    "consortium unreachable; backing off",
                    extra={"event": "agent.backoff", "failures": failures, "wait_s": delay},
                )
            self._stop.wait(delay)


def token_provider(
    settings: SiteSettings,
) -> tuple[str | TokenProvider, Callable[[], None] | None, str]:
    """The bearer token (or a renewing callable), a cache invalidator, and the mode's name.

    Client credentials (Keycloak) when ``token_url``, ``client_id`` and ``client_secret``
    are all set; otherwise the static development token ``CONCORD_SITE_TOKEN``.
    """
    if settings.token_url and settings.client_id and settings.client_secret is not None:
        from concord_protocol.tokens import ClientCredentialsTokenSource

        source = ClientCredentialsTokenSource(
            settings.token_url,
            settings.realm,
            settings.client_id,
            settings.client_secret.get_secret_value(),
        )
        return source.token, source.invalidate, "client_credentials"
    if settings.token is not None:
        return settings.token.get_secret_value(), None, "static_token"
    raise AgentError(
        "no credentials for the consortium API",
        code="agent.no_credentials",
        hint="Set CONCORD_SITE_TOKEN_URL, CONCORD_SITE_CLIENT_ID and CONCORD_SITE_CLIENT_SECRET "
        "(or CONCORD_SITE_TOKEN for development).",
    )


def configure_agent_logging(level: str = "INFO") -> None:
    """Send the agent's log to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.handlers = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def _site(settings: SiteSettings) -> tuple[str, SiteKeyPair]:
    if not settings.site_id:
        raise AgentError(
            "the site id is not set", code="agent.no_site_id", hint="Set CONCORD_SITE_SITE_ID."
        )
    return settings.site_id, SiteKeyPair.load(settings.keys_dir())


def consortium_client(
    settings: SiteSettings, *, transport: httpx.BaseTransport | None = None
) -> ConsortiumClient:
    """An API client with the site's credentials (for the agent and the CLI)."""
    token, _, _ = token_provider(settings)
    return ConsortiumClient(settings.api_url, token, transport=transport)


def verify_audit(
    settings: SiteSettings, *, transport: httpx.BaseTransport | None = None
) -> tuple[int, int | None]:
    """``site-node audit verify``: check the latest head against this site's witness state
    without cosigning (see :func:`site_node.agent.witness.verify_latest`)."""
    site_id, site_keys = _site(settings)
    token, _, _ = token_provider(settings)
    with ConsortiumClient(settings.api_url, token, transport=transport) as api:
        return verify_latest(
            api,
            site_id=site_id,
            signing_key=site_keys.signing_key,
            state_dir=settings.state_dir,
            server_head_key=settings.server_head_key,
            audit_log_id=settings.audit_log_id,
        )


def run_agent(
    settings: SiteSettings,
    *,
    once: bool = False,
    transport: httpx.BaseTransport | None = None,
    retry_base_s: float = 1.0,
) -> int:
    """Run the agent from settings; return the process exit status.

    ``once``: a single pass, status 1 if a step failed. Otherwise run until SIGTERM or
    SIGINT (status 0). Raises :class:`AgentError` or a key-file error when the site is not
    configured (the CLI turns those into status 2).
    """
    site_id, site_keys = _site(settings)
    token, invalidate, auth = token_provider(settings)
    with ConsortiumClient(settings.api_url, token, transport=transport) as api:
        agent = SiteAgent(
            api,
            site_id=site_id,
            site_keys=site_keys,
            state_dir=settings.state_dir,
            server_head_key=settings.server_head_key,
            audit_log_id=settings.audit_log_id,
            retry_base_s=retry_base_s,
            on_unauthorized=invalidate,
        )
        log.info(
            "site agent starting",
            extra={
                "event": "agent.start",
                "site_id": site_id,
                "api_url": settings.api_url,
                "auth": auth,
                "once": once,
                "poll_interval_s": settings.poll_interval_s,
            },
        )
        if once:
            return 0 if agent.run_pass().ok else 1

        def _stop(signum: int, _frame: FrameType | None) -> None:
            log.info("stop requested", extra={"event": "agent.stopping", "signal": signum})
            agent.stop()

        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, _stop)
        try:
            agent.run_forever(poll_interval_s=settings.poll_interval_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("site agent stopped", extra={"event": "agent.stop"})
        return 0
