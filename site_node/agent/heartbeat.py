"""The agent's heartbeat: a file the loop rewrites after every pass, read by the probes.

A pass that hangs (a step stuck on the network beyond its timeouts, a deadlock) stops the
heartbeat, and Kubernetes' liveness probe (``site-node agent-health``) restarts the
container. An unreachable consortium does not: the loop still turns (backing off), and a
restart would not bring the server back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["HEARTBEAT_FILE", "age_s", "beat", "clear"]

#: The heartbeat's path under the site's state dir.
HEARTBEAT_FILE = Path("agent") / "heartbeat"


def beat(state_dir: Path) -> None:
    """Record that a pass just finished (atomically: a probe never reads half a file)."""
    path = state_dir / HEARTBEAT_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{time.time():.3f}\n")
    os.replace(tmp, path)


def clear(state_dir: Path) -> None:
    """Forget the last run's heartbeat (the state dir outlives the container)."""
    (state_dir / HEARTBEAT_FILE).unlink(missing_ok=True)


def age_s(state_dir: Path) -> float | None:
    """Seconds since the last pass finished; None before the first one."""
    try:
        last = float((state_dir / HEARTBEAT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return max(0.0, time.time() - last)
