"""Study runs without a SuperLink: the ServerApp's side of the round gate, in the test.

:func:`federation_gate` is the real :class:`ApiRoundGate` the ServerApp uses, talking to the
app under test through its TestClient (so every report goes through the real internal API,
its authentication and its transaction). :func:`begin` starts a study's run the way
``POST /studies/{id}/run`` does; :func:`synthetic_run` then reports rounds as a ServerApp
would, without Flower (each aggregated round with a real encrypted aggregate when the test
holds the study key). :class:`InProcessLauncher` lets a :class:`RunManager` start such runs.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from concord_protocol.rounds import RoundRecord
from consortium_server.db.session import session_scope
from consortium_server.federation.checkpoints import GlobalModel
from consortium_server.federation.coordinator import begin_run
from consortium_server.federation.gate_client import ApiRoundGate
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.records import StudyOutcome
from consortium_server.federation.run_messages import RunVerdict
from consortium_server.policy.checks import PolicyContext
from tests.support.studies import final_aggregate, round_record

__all__ = [
    "InProcessLauncher",
    "RecordingGate",
    "begin",
    "federation_gate",
    "federation_token",
    "synthetic_run",
]


def federation_token(app: FastAPI) -> str:
    """The app's federation token (one is made up for an app started without a SuperLink)."""
    if getattr(app.state, "serverapp_token", None) is None:
        app.state.serverapp_token = SecretStr(secrets.token_urlsafe(32))
    token: str = app.state.serverapp_token.get_secret_value()
    return token


def federation_gate(app: FastAPI, client: TestClient, plan: RunPlan) -> ApiRoundGate:
    """The ServerApp's gate for ``plan``, over ``client`` (no retries needed in-process)."""
    return ApiRoundGate(
        plan,
        api_url=str(client.base_url),
        token=federation_token(app),
        client=client,
        retry_s=2.0,
        heartbeat_s=0.2,
        sleep=lambda _: None,
    )


def begin(app: FastAPI, study_id: str, *, policy: PolicyContext | None = None) -> RunPlan:
    """``approved -> running`` and the first attempt's plan, committed (as the run route)."""
    with session_scope(app.state.sessionmaker) as session:
        return begin_run(session, study_id, log=app.state.audit_log, actor=None, policy=policy)


def synthetic_run(
    gate: ApiRoundGate,
    epsilons: Sequence[float],
    *,
    secret: bytes | None = None,
    fail_at: int | None = None,
    first_round: int | None = None,
    signers: Mapping[str, Ed25519PrivateKey] | None = None,
) -> tuple[StudyOutcome, list[RunVerdict]]:
    """Report one round per epsilon (the sites' cumulative epsilon) as a ServerApp would.

    Each aggregated round uploads a real encrypted aggregate (three sites' CKKS updates,
    summed blindly) made with ``secret``; without it the upload is not a valid update.
    ``fail_at``: that round fails (too few sites). Stops at the first ``stop`` verdict.
    """
    plan = gate.plan
    start = first_round or plan.start_round
    outcome = StudyOutcome(plan.study_id, plan.contract_hash, "running")
    verdicts = []
    for n, eps in enumerate(epsilons, start=start):
        failed = n == fail_at
        record = round_record(plan, n, eps, "failed" if failed else "aggregated")
        model = None
        if not failed:
            model = (
                final_aggregate(plan, secret, n, signers=signers)
                if secret is not None
                else GlobalModel(n, (b"not an aggregate",), 300.0, "ef" * 32)
            )
            record.aggregate_digest = model.digest
        outcome.rounds.append(record)
        verdict = gate.report(record, model)
        verdicts.append(verdict)
        outcome.final_model = model or outcome.final_model
        if failed or not verdict.goes_on:
            done = not failed and n >= plan.rounds
            outcome.status = "failed" if failed else "completed" if done else "stopped"
            outcome.failure = None if done else verdict.reason
            break
    else:
        outcome.status = "completed"
    return outcome, verdicts


class RecordingGate:
    """A gate for round-loop tests without a server: keeps every report, answers
    ``continue`` (``stop`` after a failed round, or from round ``stop_after`` on)."""

    def __init__(self, *, stop_after: int | None = None) -> None:
        self.records: list[RoundRecord] = []
        self.models: list[GlobalModel | None] = []
        self.stop_after = stop_after
        self.stop_requested = False

    def report(self, record: RoundRecord, model: GlobalModel | None) -> RunVerdict:
        self.records.append(record)
        self.models.append(model)
        if record.status != "aggregated" or (
            self.stop_after is not None and record.round_number >= self.stop_after
        ):
            return RunVerdict(action="stop", reason="recorded")
        return RunVerdict(action="continue", next_round=record.round_number + 1)


class InProcessLauncher:
    """A :class:`~consortium_server.federation.runs.RunLauncher` whose runs are ``run(plan)``
    in a thread of this process (Flower run ids 1, 2, ...; stops are noted)."""

    def __init__(self, run: Callable[[RunPlan], object]) -> None:
        self._run = run
        self.started: list[RunPlan] = []
        self.stopped: list[int] = []
        self.threads: list[threading.Thread] = []

    def start(self, plan: RunPlan) -> int | None:
        self.started.append(plan)
        thread = threading.Thread(target=self._run, args=(plan,), daemon=True)
        self.threads.append(thread)
        thread.start()
        return len(self.started)

    def stop(self, run_id: int) -> None:
        self.stopped.append(run_id)

    def join(self, timeout: float = 60.0) -> None:
        """Wait for every run started so far."""
        for thread in self.threads:
            thread.join(timeout)
