"""Start a comparison run on a SuperLink and wait for what its ServerApp writes.

The product starts study runs through the consortium server, with the plan as the only run
config (``consortium_server.federation.processes.start_study_run``), and learns each round
from the ServerApp's reports. A benchmark has no consortium server: it ``flwr run``s the
comparison bundle (:func:`~benchmarks.apps.compare_server.write_compare_app`) with that
bundle's extra keys (:func:`~benchmarks.apps.compare_server.compare_run_config`) and reads
the outcome from the run's records dir (:mod:`benchmarks.apps.records`).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from benchmarks.apps.records import read_outcome
from concord_protocol.processes import FlowerProcessError, flower_env, flwr_binary
from consortium_server.federation.processes import SuperLinkHandle
from consortium_server.federation.records import StudyOutcome

__all__ = ["start_compare_run", "wait_for_outcome"]


def start_compare_run(
    link: SuperLinkHandle, app_dir: Path, config: Mapping[str, str | int | float | bool]
) -> int:
    """``flwr run`` the bundle in ``app_dir`` with ``config`` as run config; the run id."""
    with tempfile.TemporaryDirectory(prefix="concord-compare-run-") as tmp:
        path = Path(tmp) / "run-config.toml"
        path.write_text(tomli_w.dumps(dict(config)))
        args = ["run", str(app_dir), link.connection, "--run-config", str(path)]
        result = subprocess.run(
            [flwr_binary("flwr"), *args, "--format", "json"],
            env=flower_env(link.flwr_home),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    out = result.stdout + result.stderr
    start = result.stdout.find("{")
    body = json.loads(result.stdout[start:]) if start >= 0 else {}
    run_id = body.get("run-id", body.get("run_id"))
    if result.returncode != 0 or body.get("success") is False or run_id is None:
        raise FlowerProcessError("flwr run did not start a run", out)
    return int(str(run_id))


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
