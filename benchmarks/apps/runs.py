"""Start a comparison run on a SuperLink and wait for what its ServerApp writes.

The product starts study runs through the consortium server, with the plan as the only run
config (``consortium_server.federation.processes.start_study_run``), and learns each round
from the ServerApp's reports. A benchmark has no consortium server: it starts a run of the
comparison bundle (:func:`~benchmarks.apps.compare_server.write_compare_app`) with that
bundle's extra keys (:func:`~benchmarks.apps.compare_server.compare_run_config`) and reads
the outcome from the run's records dir (:mod:`benchmarks.apps.records`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from benchmarks.apps.records import read_outcome
from concord_protocol.processes import FlowerProcessError
from consortium_server.federation.processes import SuperLinkHandle, start_run
from consortium_server.federation.records import StudyOutcome

__all__ = ["start_compare_run", "wait_for_outcome"]


def start_compare_run(
    link: SuperLinkHandle, app_dir: Path, config: Mapping[str, str | int | float | bool]
) -> int:
    """Start a run of the bundle in ``app_dir`` with ``config`` as run config (the SuperLink's
    Control API, over mutual TLS); the run id. The SuperLink must allow the bundle's
    ServerApp (``start_superlink(..., serverapp_bundles=...)``)."""
    return start_run(link, app_dir, dict(config))


def wait_for_outcome(
    records_dir: Path, *, timeout: float, link: SuperLinkHandle | None = None
) -> StudyOutcome:
    """The outcome the ServerApp writes to ``records_dir`` once the run is over.

    Raises :class:`FlowerProcessError` (with the SuperLink's log tail) when ``timeout``
    passes first or the SuperLink exits.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = read_outcome(records_dir)
        if outcome is not None:
            return outcome
        if link is not None and link.process is not None and not link.process.alive():
            raise FlowerProcessError("the SuperLink exited", link.process.log_tail())
        time.sleep(0.5)
    raise FlowerProcessError(
        f"no outcome in {records_dir} after {timeout:.0f}s",
        link.process.log_tail() if link is not None and link.process is not None else "",
    )
