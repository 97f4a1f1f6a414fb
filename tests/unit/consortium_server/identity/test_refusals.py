"""Refused sign-ins are aggregated: bounded entries and counters per window, whatever the
number of refusals or of sources sending them."""

from __future__ import annotations

from consortium_server.identity.refusals import OTHER, RefusedSignIns


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_first_refusal_of_each_source_is_written_and_the_rest_counted() -> None:
    clock = Clock()
    refusals = RefusedSignIns(window_s=60, max_entries=3, max_sources=5, clock=clock)
    written = [refusals.refuse("10.0.0.1", "auth.invalid_token")[0].write for _ in range(50)]
    assert written == [True] + [False] * 49
    assert refusals.refuse("10.0.0.2", "auth.invalid_token")[0].write
    assert refusals.refuse("10.0.0.1", "auth.expired_token")[0].write
    # A fourth pair in the window: only counted (at most max_entries written per window).
    assert not refusals.refuse("10.0.0.3", "auth.invalid_token")[0].write
    clock.now = 61
    decision, summary = refusals.refuse("10.0.0.1", "auth.invalid_token")
    assert decision.write  # a new window: its first refusal is written again
    assert summary is not None
    assert summary.counts == {
        ("10.0.0.1", "auth.invalid_token"): 49,
        ("10.0.0.3", "auth.invalid_token"): 1,
    }
    assert summary.details()["total"] == 50


def test_rotating_sources_cannot_grow_memory_or_the_log() -> None:
    """100,000 refusals from 100,000 addresses: 20 entries, 1,000 counters and an `other`
    bucket, and a summary that still adds up to every refusal."""
    clock = Clock()
    refusals = RefusedSignIns(window_s=60, max_entries=20, max_sources=1000, clock=clock)
    writes = sum(
        refusals.refuse(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "auth.invalid_token")[
            0
        ].write
        for i in range(100_000)
    )
    assert writes == 20
    assert refusals.counters == 1001
    summary = refusals.flush()
    assert summary is not None
    assert summary.details()["total"] == 100_000 - 20
    assert summary.counts[OTHER] == 100_000 - 20 - 1000
    assert refusals.flush() is None  # flushed: nothing left
