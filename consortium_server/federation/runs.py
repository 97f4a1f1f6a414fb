"""Running approved studies on the consortium's SuperLink, in the background.

``POST /api/v1/studies/{id}/run`` moves the study to ``running`` in the request, then a
:class:`RunManager` thread submits the Flower run (``flwr run`` with the study's plan as run
config) and follows the round records the ServerApp writes: each round is audited and
charged as soon as its file appears, so a server that restarts mid-study has every finished
round on record. The study ends ``completed`` or ``failed`` with the reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from consortium_server.audit.log import AuditLog
from consortium_server.federation.coordinator import Runner, RunStoppedError, continue_run
from consortium_server.federation.processes import (
    FlowerProcessError,
    SuperLinkHandle,
    start_study_run,
    stop_run,
    write_connection,
)
from consortium_server.federation.serverapp import read_outcome
from consortium_server.federation.strategy import RoundHook, RoundRecord, RunPlan, StudyOutcome
from consortium_server.policy.checks import PolicyContext
from consortium_server.settings import ServerSettings

__all__ = ["RunManager", "build_run_manager", "connect_superlink", "superlink_runner"]

log = logging.getLogger("concord.federation")


def connect_superlink(settings: ServerSettings) -> SuperLinkHandle | None:
    """A ``flwr`` connection to the configured SuperLink (None when runs are disabled)."""
    federation = settings.federation
    if not federation.superlink_address:
        return None
    if federation.root_certificates is None and not federation.insecure:
        raise ValueError(
            "federation.root_certificates is required (or federation.insecure for loopback tests)"
        )
    flwr_home = settings.data_dir / "flwr-home"
    write_connection(
        flwr_home,
        "concord",
        federation.superlink_address,
        root_certificates=None if federation.insecure else federation.root_certificates,
    )
    return SuperLinkHandle(None, federation.superlink_address, flwr_home, "concord")


def superlink_runner(
    link: SuperLinkHandle,
    *,
    app_dir: Path,
    work_dir: Path,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
) -> Runner:
    """A runner that starts the run on ``link`` and reports rounds as their records appear."""

    def run(plan: RunPlan, hook: RoundHook) -> StudyOutcome:
        records = plan.records_dir
        if records is None:
            raise ValueError("the plan needs a records_dir")
        records.mkdir(parents=True, exist_ok=True)
        run_id = start_study_run(link, app_dir, plan, work_dir)
        log.info("study run started", extra={"study_id": plan.study_id, "run_id": run_id})
        limit = timeout_s or plan.rounds * (plan.round_timeout_s * 2 + 60) + plan.node_wait_s
        deadline = time.monotonic() + limit
        reported: set[int] = set()

        def report(record: RoundRecord) -> None:
            if record.round_number in reported:
                return
            reported.add(record.round_number)
            try:
                hook(record)
            except RunStoppedError:
                stop_run(link, run_id)
                raise

        while True:
            for path in sorted(records.glob("round-*.json")):
                if int(path.stem.removeprefix("round-")) not in reported:
                    report(RoundRecord(**json.loads(path.read_text())))
            outcome = read_outcome(records)
            if outcome is not None:
                for record in outcome.rounds:
                    report(record)
                return outcome
            if time.monotonic() > deadline:
                stop_run(link, run_id)
                raise FlowerProcessError(f"no outcome after {limit:.0f}s", "")
            time.sleep(poll_s)

    return run


class RunManager:
    """Runs studies in background threads (one at a time by default)."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        audit_log: AuditLog,
        runner_for: Callable[[RunPlan], Runner],
        *,
        policy: PolicyContext | None = None,
        max_concurrent: int = 1,
    ) -> None:
        self._factory = factory
        self._log = audit_log
        self._policy = policy
        self._runner_for = runner_for
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="study-run")
        self._lock = threading.Lock()
        self._futures: dict[str, Future[StudyOutcome]] = {}

    def submit(self, plan: RunPlan) -> None:
        """Run ``plan`` (its study already ``running`` and committed) in the background."""
        with self._lock:
            self._futures[plan.study_id] = self._pool.submit(
                continue_run,
                self._factory,
                self._log,
                plan,
                self._runner_for(plan),
                policy=self._policy,
            )

    def wait(self, study_id: str, timeout: float | None = None) -> StudyOutcome:
        """Block until the study's run ends (tests, the demo)."""
        with self._lock:
            future = self._futures[study_id]
        return future.result(timeout=timeout)

    def shutdown(self) -> None:
        """Stop accepting runs; running ones finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_run_manager(
    settings: ServerSettings,
    factory: sessionmaker[Session],
    audit_log: AuditLog,
    policy: PolicyContext | None = None,
) -> RunManager | None:
    """The run manager for the configured SuperLink (None when runs are disabled)."""
    from site_node.federation import APP_DIR

    link = connect_superlink(settings)
    if link is None:
        return None
    app_dir = settings.federation.app_dir or APP_DIR
    runs = settings.runs_dir()

    def runner_for(plan: RunPlan) -> Runner:
        return superlink_runner(
            link,
            app_dir=app_dir,
            work_dir=runs / plan.study_id,
            timeout_s=settings.federation.run_timeout_s,
        )

    return RunManager(factory, audit_log, runner_for, policy=policy)
