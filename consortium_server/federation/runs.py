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
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.processes import FlowerProcessError
from concord_protocol.rounds import RoundRecord
from consortium_server.audit.log import AuditLog
from consortium_server.db.session import session_scope
from consortium_server.errors import DomainError
from consortium_server.federation import leases
from consortium_server.federation.coordinator import (
    Runner,
    RunStoppedError,
    continue_run,
    finish_run,
    resume_run,
)
from consortium_server.federation.processes import (
    SuperLinkHandle,
    run_status,
    start_study_run,
    stop_run,
    write_connection,
)
from consortium_server.federation.serverapp import (
    HEARTBEAT_FILE,
    HEARTBEAT_INTERVAL_S,
    heartbeat_alive,
    load_checkpoint,
    read_outcome,
    read_round_records,
    write_json,
)
from consortium_server.federation.strategy import RoundHook, RunPlan, StudyOutcome
from consortium_server.policy.checks import PolicyContext
from consortium_server.settings import ServerSettings
from consortium_server.studies.models import Study, StudyState

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


#: Where the runner notes the Flower run that is working on a study (for a restarted server).
RUN_FILE = "run.json"
_ACTIVE = ("pending", "starting", "running")


def _read_run_file(records: Path) -> dict[str, int] | None:
    try:
        body = json.loads((records / RUN_FILE).read_text())
        return {"run_id": int(body["run_id"]), "start_round": int(body["start_round"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def superlink_runner(
    link: SuperLinkHandle,
    *,
    app_dir: Path,
    work_dir: Path,
    timeout_s: float | None = None,
    poll_s: float = 0.5,
    liveness_s: float = 3 * HEARTBEAT_INTERVAL_S,
) -> Runner:
    """A runner that runs the study on ``link`` and reports rounds as their records appear.

    It picks up where an earlier runner (before a restart of the consortium server) left:

    1. round records already on disk from ``plan.start_round`` on are reported first (the
       ServerApp finished them while nobody was following);
    2. if the ServerApp's outcome is there, that is the result;
    3. if the Flower run noted in ``run.json`` is still active on the SuperLink and its
       ServerApp's heartbeat file still changes, it is followed (the SuperLink survived the
       restart; a SuperLink that was restarted too lists its lost run as running for a
       while, but nothing beats for it);
    4. otherwise a new run starts after the last aggregated round, from its checkpoint
       (the SuperLink was restarted too). All rounds done but no outcome: the last
       checkpoint is the final model.
    """

    def run(plan: RunPlan, hook: RoundHook) -> StudyOutcome:
        records = plan.records_dir
        if records is None:
            raise ValueError("the plan needs a records_dir")
        records.mkdir(parents=True, exist_ok=True)
        reported: set[int] = set()
        last_aggregated = plan.start_round - 1

        def report(record: RoundRecord) -> None:
            nonlocal last_aggregated
            if record.round_number in reported or record.round_number < plan.start_round:
                return
            reported.add(record.round_number)
            if record.status == "aggregated":
                last_aggregated = max(last_aggregated, record.round_number)
            hook(record)

        def collect() -> StudyOutcome | None:
            """Report the round records on disk; the outcome once there is one."""
            for record in read_round_records(records):
                report(record)
            outcome = read_outcome(records)
            for record in outcome.rounds if outcome is not None else ():
                report(record)
            return outcome

        noted = _read_run_file(records)
        try:
            if (outcome := collect()) is not None:
                return outcome
        except RunStoppedError:
            if noted is not None:
                stop_run(link, noted["run_id"])
            raise
        if (
            noted is not None
            and run_status(link, noted["run_id"]) in _ACTIVE
            and heartbeat_alive(records / HEARTBEAT_FILE, within_s=liveness_s)
        ):
            run_id = noted["run_id"]
            log.info(
                "following the study's run", extra={"study_id": plan.study_id, "run_id": run_id}
            )
        elif last_aggregated >= plan.rounds:
            return _outcome_from_checkpoint(plan, records)
        else:
            if noted is not None:
                stop_run(link, noted["run_id"])  # a run the SuperLink lost track of
            attempt = replace(plan, start_round=last_aggregated + 1)
            if attempt.start_round > 1:
                load_checkpoint(records, attempt.start_round - 1)  # fail now if it is missing
            run_id = start_study_run(link, app_dir, attempt, work_dir)
            write_json(records / RUN_FILE, {"run_id": run_id, "start_round": attempt.start_round})
            log.info(
                "study run started",
                extra={"study_id": plan.study_id, "run_id": run_id, "round": attempt.start_round},
            )
        remaining = plan.rounds - last_aggregated
        limit = timeout_s or remaining * (plan.round_timeout_s * 2 + 60) + plan.node_wait_s
        deadline = time.monotonic() + limit
        try:
            while (outcome := collect()) is None:
                if time.monotonic() > deadline:
                    raise FlowerProcessError(f"no outcome after {limit:.0f}s", "")
                time.sleep(poll_s)
        except (RunStoppedError, FlowerProcessError):
            stop_run(link, run_id)
            raise
        return outcome

    return run


def _outcome_from_checkpoint(plan: RunPlan, records: Path) -> StudyOutcome:
    """Every round aggregated, the ServerApp gone before writing its outcome."""
    rounds = read_round_records(records)
    final = load_checkpoint(records, plan.rounds)
    return StudyOutcome(plan.study_id, plan.contract_hash, "completed", rounds, final_model=final)


class RunManager:
    """Runs studies in background threads (one at a time by default).

    Each study it follows is leased to it in the database (:mod:`.leases`, holder
    ``holder``): the lease is claimed when the study starts (in the same transaction) or is
    resumed, renewed by :meth:`start_keeper`'s thread, and released when the study ends.
    The keeper also takes over running studies whose lease expired (their replica died).
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        audit_log: AuditLog,
        runner_for: Callable[[RunPlan], Runner],
        *,
        policy: PolicyContext | None = None,
        max_concurrent: int = 1,
        holder: str | None = None,
        lease_ttl_s: float = 30.0,
    ) -> None:
        self._factory = factory
        self._log = audit_log
        self._policy = policy
        self._runner_for = runner_for
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="study-run")
        self._lock = threading.Lock()
        self._futures: dict[str, Future[StudyOutcome]] = {}
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_ttl_s = lease_ttl_s
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def claim(self, session: Session, study_id: str) -> bool:
        """Lease ``study_id`` to this manager in ``session`` (the caller commits)."""
        return leases.claim(session, study_id, self.holder, ttl_s=self.lease_ttl_s)

    def submit(self, plan: RunPlan) -> None:
        """Run ``plan`` (its study already ``running``, leased to this manager, committed)
        in the background."""
        with self._lock:
            self._futures[plan.study_id] = self._pool.submit(self._run, plan)

    def _run(self, plan: RunPlan) -> StudyOutcome:
        try:
            return continue_run(
                self._factory, self._log, plan, self._runner_for(plan), policy=self._policy
            )
        finally:
            with session_scope(self._factory) as session:
                leases.release(session, plan.study_id, self.holder)

    def following(self) -> list[str]:
        """Studies this manager is running or about to run."""
        with self._lock:
            return sorted(sid for sid, future in self._futures.items() if not future.done())

    def resume_interrupted(self, runs_dir: Path) -> list[str]:
        """Go on with every study left ``running`` whose lease is free (its server stopped
        mid-study) and that this manager can lease.

        Each resumes after its last recorded round (:func:`resume_run`, audited); the
        runner finds what happened meanwhile on disk and on the SuperLink. A study that
        cannot go on (the policy now denies its next round, its plan is unbuildable) is
        failed with the reason, its reservation returned. Returns the resumed study ids.
        """
        with session_scope(self._factory) as session:
            running = list(
                session.scalars(
                    select(Study.id).where(Study.state == StudyState.RUNNING).order_by(Study.id)
                )
            )
        mine = set(self.following())
        resumed: list[str] = []
        for study_id in (s for s in running if s not in mine):
            failure: str | None = None
            with session_scope(self._factory) as session:
                if not self.claim(session, study_id):
                    continue  # another replica follows it
                try:
                    plan = resume_run(
                        session,
                        study_id,
                        log=self._log,
                        records_dir=runs_dir / study_id,
                        policy=self._policy,
                    )
                except DomainError as exc:  # the recorded denial is committed with it
                    failure = f"not resumed: {exc.public_message()}"
                except ValueError as exc:  # a plan that cannot be built any more
                    failure = f"not resumed: {exc}"
            if failure is not None:
                log.warning("study cannot be resumed", extra={"study_id": study_id})
                with session_scope(self._factory) as session:
                    finish_run(
                        session,
                        StudyOutcome(study_id, "", "failed", failure=failure),
                        log=self._log,
                    )
                    leases.release(session, study_id, self.holder)
                continue
            log.info("resuming study", extra={"study_id": study_id, "round": plan.start_round})
            self.submit(plan)
            resumed.append(study_id)
        return resumed

    def keep_leases(self, runs_dir: Path | None = None) -> None:
        """One keeper pass: renew the leases of the studies this manager follows; with
        ``runs_dir``, take over running studies whose lease expired."""
        for study_id in self.following():
            with session_scope(self._factory) as session:
                if not leases.renew(session, study_id, self.holder, ttl_s=self.lease_ttl_s):
                    log.error(
                        "lost the lease of a study this server follows",
                        extra={"study_id": study_id},
                    )
        if runs_dir is not None:
            self.resume_interrupted(runs_dir)

    def start_keeper(self, runs_dir: Path | None, *, interval_s: float | None = None) -> None:
        """Run :meth:`keep_leases` every ``interval_s`` (a third of the lease) in a thread."""
        every = interval_s or self.lease_ttl_s / 3

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.keep_leases(runs_dir)
                except Exception:  # the database may be down for a while; try again later
                    log.exception("lease keeper pass failed")

        self._keeper = threading.Thread(target=loop, name="run-lease-keeper", daemon=True)
        self._keeper.start()

    def wait(self, study_id: str, timeout: float | None = None) -> StudyOutcome:
        """Block until the study's run ends (tests, the demo)."""
        with self._lock:
            future = self._futures[study_id]
        return future.result(timeout=timeout)

    def shutdown(self) -> None:
        """Stop accepting runs and the keeper; running ones finish."""
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
    from concord_protocol.bundle import APP_DIR

    app_dir = settings.federation.app_dir or APP_DIR
    runs = settings.runs_dir()

    def runner_for(plan: RunPlan) -> Runner:
        return superlink_runner(
            link,
            app_dir=app_dir,
            work_dir=runs / plan.study_id,
            timeout_s=settings.federation.run_timeout_s,
        )

    return RunManager(
        factory,
        audit_log,
        runner_for,
        policy=policy,
        holder=settings.federation.replica_id,
        lease_ttl_s=settings.federation.lease_ttl_s,
    )
