"""Refused sign-ins, counted and written to the audit log in bounded numbers.

Every request with a token that does not verify is a refused sign-in, and the audit log must
show them (a burst of forged tokens is what a compliance officer wants to see). One entry
per refusal would let anyone grow the tamper-evident log without limit, so refusals are
aggregated per window of ``window_s`` seconds:

* the first refusal of a (source address, error code) pair in a window is written at once
  (``auth.sign_in_refused``, ``count: 1``), up to ``max_entries`` such entries per window;
* every further refusal in the window is only counted, in memory, for at most
  ``max_sources`` distinct pairs (beyond that, into one ``other`` bucket);
* when the window has passed, the next refusal (or the server's shutdown) writes one
  ``auth.sign_ins_refused`` summary: per source and code, how many refusals were not
  written one by one, with the window's bounds.

So a window adds at most ``max_entries + 1`` entries and holds at most ``max_sources + 1``
counters in memory, whatever the number of bad requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = ["OTHER", "RefusalDecision", "RefusedSignIns", "Summary"]

#: The bucket of refusals from sources beyond ``max_sources`` in one window.
OTHER = ("other", "other")


@dataclass(frozen=True)
class RefusalDecision:
    """What to do with one refusal: write it as its own entry, or only count it."""

    write: bool


@dataclass(frozen=True)
class Summary:
    """The refusals of one window that were counted, not written one by one."""

    started_at: datetime
    ended_at: datetime
    counts: dict[tuple[str, str], int]

    def details(self) -> dict[str, object]:
        """JSON-ready details of the ``auth.sign_ins_refused`` entry."""
        return {
            "window_started_at": self.started_at.isoformat(),
            "window_ended_at": self.ended_at.isoformat(),
            "total": sum(self.counts.values()),
            "by_source": [
                {"client": client, "code": code, "count": count}
                for (client, code), count in sorted(self.counts.items())
            ],
        }


@dataclass
class RefusedSignIns:
    """The aggregation state of one server process (thread-safe)."""

    window_s: float = 60.0
    max_entries: int = 20
    max_sources: int = 1000
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _window_start: float | None = None
    _window_started_at: datetime | None = None
    _written: set[tuple[str, str]] = field(default_factory=set)
    _counted: dict[tuple[str, str], int] = field(default_factory=dict)

    def refuse(self, client: str, code: str) -> tuple[RefusalDecision, Summary | None]:
        """Note one refusal. Returns whether to write it now, and the summary of the
        previous window when this refusal opened a new one (write that too)."""
        key = (client[:64], code[:64])
        with self._lock:
            summary = self._roll()
            if key not in self._written and len(self._written) < self.max_entries:
                self._written.add(key)
                return RefusalDecision(write=True), summary
            if key not in self._counted and len(self._counted) >= self.max_sources:
                key = OTHER
            self._counted[key] = self._counted.get(key, 0) + 1
            return RefusalDecision(write=False), summary

    def flush(self) -> Summary | None:
        """The counted refusals of the current window, ending it (at shutdown)."""
        with self._lock:
            summary = self._summary()
            self._window_start = None
            return summary

    @property
    def counters(self) -> int:
        """Distinct counters held in memory now (bounded by ``max_sources + 1``)."""
        return len(self._counted)

    def _roll(self) -> Summary | None:
        now = self.clock()
        if self._window_start is not None and now - self._window_start < self.window_s:
            return None
        summary = self._summary()
        self._window_start = now
        self._window_started_at = datetime.now(UTC)
        return summary

    def _summary(self) -> Summary | None:
        counted, self._counted = self._counted, {}
        self._written = set()
        if not counted or self._window_started_at is None:
            return None
        return Summary(self._window_started_at, datetime.now(UTC), counted)
