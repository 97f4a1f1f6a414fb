"""Starting study runs, and restarting those whose ServerApp went silent.

The server does not follow a run: the ServerApp reports every round to the internal API and
waits for each verdict (:mod:`consortium_server.federation.round_gate`). What is left here:

* :meth:`RunManager.start`: after :func:`~consortium_server.federation.coordinator.begin_run`
  committed, launch the run (``flwr run`` on the SuperLink) in the background and note its
  Flower run id; a launch that fails fails the study with the reason.
* :meth:`RunManager.sweep` (every few seconds in a keeper thread, on every replica): a
  running study whose current attempt has not been heard from for ``liveness_s`` (its
  ServerApp died with the SuperLink, or its pod) gets a new attempt, from the round after
  the last recorded one (:func:`~consortium_server.federation.study_runs.replace_stale`,
  so exactly one replica wins); the old Flower run is stopped and a new one launched. A
  study whose run keeps being restarted without a round recorded in between is failed after
  ``max_restarts``. Silence is counted from when this server started at the earliest, so a
  server that was down itself first waits for the ServerApp to reach it again.

:class:`SuperLinkLauncher` launches on a real SuperLink; tests give another launcher.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.bundle import APP_DIR
from concord_protocol.fields import utcnow
from consortium_server.audit.log import AuditLog
from consortium_server.db.session import session_scope
from consortium_server.errors import DomainError
from consortium_server.federation.coordinator import finish_run, resume_run
from consortium_server.federation.plan import RunPlan
from consortium_server.federation.processes import (
    ControlEndpoint,
    SuperLinkHandle,
    start_study_run,
    stop_run,
    write_connection,
)
from consortium_server.federation.study_runs import StudyRun, new_attempt, replace_stale
from consortium_server.policy.checks import PolicyContext
from consortium_server.settings import ServerSettings
from consortium_server.studies.models import Study, StudyState

__all__ = [
    "RunLauncher",
    "RunManager",
    "SuperLinkLauncher",
    "build_run_manager",
    "connect_superlink",
]

log = logging.getLogger("concord.federation")


class RunLauncher(Protocol):
    """Starts and stops the Flower runs of studies."""

    def start(self, plan: RunPlan) -> int | None:
        """Launch a run of ``plan``; its Flower run id, if it has one."""
        ...

    def stop(self, run_id: int) -> None:
        """Stop a run (one that is over already is no error)."""
        ...


class SuperLinkLauncher:
    """Control ``StartRun`` / ``StopRun`` of the Concord app bundle on a SuperLink."""

    def __init__(self, link: SuperLinkHandle, *, app_dir: Path = APP_DIR) -> None:
        self.link = link
        self.app_dir = app_dir

    def start(self, plan: RunPlan) -> int | None:
        """``StartRun`` with the plan as run config."""
        return start_study_run(self.link, self.app_dir, plan)

    def stop(self, run_id: int) -> None:
        """``StopRun``."""
        stop_run(self.link, run_id)


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
    control = ControlEndpoint(
        address=federation.superlink_address,
        ca_cert=federation.root_certificates,
        client_cert=federation.client_certificate,
        client_key=federation.client_private_key,
        insecure=federation.insecure,
    )
    return SuperLinkHandle(None, federation.superlink_address, flwr_home, "concord", control)


class RunManager:
    """Launches study runs and restarts the ones that went silent (see the module)."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        audit_log: AuditLog,
        launcher: RunLauncher,
        *,
        policy: PolicyContext | None = None,
        liveness_s: float = 30.0,
        max_restarts: int = 3,
        started_at: datetime | None = None,
    ) -> None:
        self._factory = factory
        self._log = audit_log
        self._launcher = launcher
        self._policy = policy
        self.liveness_s = liveness_s
        self.max_restarts = max_restarts
        self.started_at = started_at or utcnow()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="study-run")
        self._launches: list[Future[None]] = []
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    # --- launching -------------------------------------------------------------------

    def start(self, plan: RunPlan) -> None:
        """Launch ``plan`` (its study is ``running`` with this attempt, committed) in the
        background."""
        self._launches.append(self._pool.submit(self._launch, plan))

    def wait_launched(self, timeout: float | None = None) -> None:
        """Block until every launch (and stop) started so far has returned (tests, the
        demo)."""
        wait(list(self._launches), timeout=timeout)

    def _launch(self, plan: RunPlan) -> None:
        try:
            run_id = self._launcher.start(plan)
        except Exception as exc:  # the study must not stay "running" with nothing running
            log.error("study run not started", extra={"study_id": plan.study_id})
            self._fail(plan.study_id, plan.attempt, f"the run did not start: {exc}")
            return
        with session_scope(self._factory) as session:
            row = session.get(StudyRun, plan.study_id, with_for_update=True)
            if row is not None and row.attempt == plan.attempt:
                row.flower_run_id = run_id
        log.info(
            "study run started",
            extra={"study_id": plan.study_id, "run_id": run_id, "round": plan.start_round},
        )

    def _fail(self, study_id: str, attempt: str, reason: str) -> None:
        with session_scope(self._factory) as session:
            study = session.get(Study, study_id, with_for_update=True)
            row = session.get(StudyRun, study_id)
            if study is None or study.state is not StudyState.RUNNING:
                return
            if row is not None and row.attempt != attempt:
                return  # another attempt took over meanwhile
            finish_run(session, study_id, completed=False, reason=reason, log=self._log)

    # --- stopping --------------------------------------------------------------------

    def stop_runs(self, study_ids: list[str]) -> list[int]:
        """Stop at once the Flower runs of studies that were just aborted (committed).

        Their ServerApps would stop anyway at their next heartbeat or round report (the
        round gate answers ``stop`` to a study that is not running); this also cuts the
        round in flight, so no further message of the study goes to any SuperNode. The
        stops run in the background (``flwr stop`` may take seconds; :meth:`wait_launched`
        waits for them too); one that fails is logged, not raised (the heartbeat verdict
        still stops the run). Returns the Flower run ids it asks the SuperLink to stop.
        """
        if not study_ids:
            return []
        with session_scope(self._factory) as session:
            run_ids = [
                run_id
                for run_id in session.scalars(
                    select(StudyRun.flower_run_id).where(StudyRun.study_id.in_(study_ids))
                )
                if run_id is not None
            ]
        for run_id in run_ids:
            self._launches.append(self._pool.submit(self._stop_run, run_id))
        return run_ids

    def _stop_run(self, run_id: int) -> None:
        try:
            self._launcher.stop(run_id)
        except Exception:  # the SuperLink may be down; the heartbeat verdict stops it
            log.warning("study run not stopped", extra={"run_id": run_id}, exc_info=True)
        else:
            log.info("study run stopped", extra={"run_id": run_id})

    # --- restarting ------------------------------------------------------------------

    def sweep(self, *, now: datetime | None = None) -> list[str]:
        """Restart every running study whose ServerApp went silent; the restarted ids."""
        now = now or utcnow()
        if now < self.started_at + timedelta(seconds=self.liveness_s):
            return []  # give live ServerApps the time to reach this (re)started server
        with session_scope(self._factory) as session:
            running = session.execute(
                select(Study.id, StudyRun.attempt, StudyRun.last_contact_at)
                .outerjoin(StudyRun, StudyRun.study_id == Study.id)
                .where(Study.state == StudyState.RUNNING)
                .order_by(Study.id)
            ).all()
        restarted = []
        for study_id, attempt, last_contact in running:
            if last_contact is not None and last_contact > now - timedelta(seconds=self.liveness_s):
                continue
            if self._restart(study_id, attempt, now=now):
                restarted.append(study_id)
        return restarted

    def _restart(self, study_id: str, seen_attempt: str | None, *, now: datetime) -> bool:
        old_run_id: int | None = None
        failure: str | None = None
        plan: RunPlan | None = None
        with session_scope(self._factory) as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.state is not StudyState.RUNNING:
                return False
            before = session.get(StudyRun, study_id)
            old_run_id = before.flower_run_id if before is not None else None
            start_round = study.current_round + 1
            if seen_attempt is None:  # a study that ran before runs were tracked
                run = new_attempt(session, study_id, start_round=start_round)
            else:
                replaced = replace_stale(
                    session,
                    study_id,
                    seen_attempt=seen_attempt,
                    start_round=start_round,
                    silent_for_s=self.liveness_s,
                    now=now,
                )
                if replaced is None:
                    return False  # another replica restarted it, or it spoke up just now
                run = replaced
            if run.restarts > self.max_restarts:
                failure = (
                    f"the run was restarted {run.restarts - 1} times without recording a round"
                )
            else:
                try:
                    plan = resume_run(session, study_id, run, log=self._log, policy=self._policy)
                except DomainError as exc:  # the recorded denial is committed with it
                    failure = f"not resumed: {exc.public_message()}"
                except ValueError as exc:  # a plan that cannot be built any more
                    failure = f"not resumed: {exc}"
        if old_run_id is not None:
            self._launcher.stop(old_run_id)
        if failure is not None or plan is None:
            log.warning("study cannot be resumed", extra={"study_id": study_id})
            with session_scope(self._factory) as session:
                if (study := session.get(Study, study_id)) is not None and (
                    study.state is StudyState.RUNNING
                ):
                    finish_run(
                        session, study_id, completed=False, reason=failure or "", log=self._log
                    )
            return False
        log.info("restarting a silent study run", extra={"study_id": study_id})
        self._launch(plan)
        return True

    def start_keeper(self, *, interval_s: float | None = None) -> None:
        """Run :meth:`sweep` every ``interval_s`` (a third of the liveness window)."""
        every = interval_s or self.liveness_s / 3

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.sweep()
                except Exception:  # the database may be down for a while; try again later
                    log.exception("run keeper pass failed")

        self._keeper = threading.Thread(target=loop, name="run-keeper", daemon=True)
        self._keeper.start()

    def shutdown(self) -> None:
        """Stop the keeper; launches in progress finish."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_run_manager(
    settings: ServerSettings,
    link: SuperLinkHandle,
    factory: sessionmaker[Session],
    audit_log: AuditLog,
    policy: PolicyContext | None = None,
) -> RunManager:
    """The run manager for the SuperLink ``link`` (:func:`connect_superlink`)."""
    return RunManager(
        factory,
        audit_log,
        SuperLinkLauncher(link, app_dir=settings.federation.app_dir or APP_DIR),
        policy=policy,
        liveness_s=settings.federation.run_liveness_s,
        max_restarts=settings.federation.max_restarts,
    )
