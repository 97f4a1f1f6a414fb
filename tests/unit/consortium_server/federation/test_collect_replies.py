"""The ServerApp's reply loop: push once, pull every poll_s until every message has a reply
or the round's timeout passes (Flower's own loop waits 3 s between pulls)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from flwr.app import Message
from flwr.serverapp import Grid

from consortium_server.federation.serverapp import (
    PULL_RETRIES,
    PULL_RETRY_CAP_S,
    REPLY_POLL_S,
    collect_replies,
)


class ScriptedGrid(Grid):
    """Replies become available after a set number of pulls; records what was asked."""

    def __init__(self, ready_after: dict[int, int]) -> None:
        self.ready_after = ready_after  # node -> pulls before its reply is there
        self.pulls: list[set[str]] = []
        self.pushed: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            self.pushed.append(msg)
            ids.append(f"m{msg.metadata.dst_node_id}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        asked = set(message_ids)
        self.pulls.append(asked)
        replies = []
        for msg in self.pushed:
            node = msg.metadata.dst_node_id
            if f"m{node}" in asked and len(self.pulls) > self.ready_after[node]:
                replies.append(_msg(reply_to_message_id=f"m{node}"))
        return replies

    # The rest of the Grid interface is not used by collect_replies.
    def set_run(self, run: Any) -> None:
        raise AssertionError("unused")

    @property
    def run(self) -> Any:
        raise AssertionError("unused")

    def create_message(self, *a: Any, **k: Any) -> Message:
        raise AssertionError("unused")

    def get_node_ids(self) -> list[int]:
        return sorted(self.ready_after)

    def send_and_receive(self, *a: Any, **k: Any) -> list[Message]:
        raise AssertionError("collect_replies must not use Flower's 3 s loop")


def _msg(**metadata: Any) -> Message:
    """A stand-in with the metadata collect_replies reads (a Message needs a Flower run)."""
    return cast(Message, SimpleNamespace(metadata=SimpleNamespace(**metadata)))


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [_msg(dst_node_id=node, message_type="train") for node in nodes]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_replies_are_collected_as_soon_as_they_arrive() -> None:
    grid, clock = ScriptedGrid({1: 0, 2: 3, 3: 5}), Clock()
    replies = collect_replies(
        grid, _messages([1, 2, 3]), timeout=60, clock=clock, sleep=clock.sleep
    )
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"]
    assert len(grid.pulls) == 6  # stopped at the pull that found the last reply
    assert clock.slept == [REPLY_POLL_S] * 5
    assert grid.pulls[1] == {"m2", "m3"}  # an answered message is not asked for again


def test_the_round_timeout_ends_the_wait_with_what_came() -> None:
    grid, clock = ScriptedGrid({1: 0, 2: 10**9}), Clock()
    replies = collect_replies(grid, _messages([1, 2]), timeout=2.0, clock=clock, sleep=clock.sleep)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert clock.now >= 2.0
    assert clock.now < 2.0 + 2 * REPLY_POLL_S


def test_a_message_flower_could_not_push_is_not_waited_for() -> None:
    class Refusing(ScriptedGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            ids = super().push_messages(messages)
            return [ids[0], None]  # type: ignore[list-item]

    grid, clock = Refusing({1: 2, 2: 0}), Clock()
    replies = collect_replies(grid, _messages([1, 2]), timeout=60, clock=clock, sleep=clock.sleep)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert clock.now < 1.0  # not the round's 60 s


class BusyGrid(ScriptedGrid):
    """A SuperLink whose state is locked for the first ``busy`` pulls (HTTP 500)."""

    def __init__(self, ready_after: dict[int, int], *, busy: int, status: int = 500) -> None:
        super().__init__(ready_after)
        self.busy, self.status, self.failed = busy, status, 0

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        if self.failed < self.busy:
            self.failed += 1
            request = httpx.Request("POST", "https://127.0.0.1/v1/runtime/pull-messages")
            response = httpx.Response(self.status, request=request)
            raise httpx.HTTPStatusError("locked", request=request, response=response)
        return super().pull_messages(message_ids)


def test_a_busy_superlink_delays_the_replies_but_loses_none() -> None:
    grid, clock = BusyGrid({1: 0, 2: 0, 3: 0}, busy=3), Clock()
    replies = collect_replies(
        grid, _messages([1, 2, 3]), timeout=600, clock=clock, sleep=clock.sleep
    )
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"]
    assert grid.failed == 3
    assert clock.slept == [min(PULL_RETRY_CAP_S, REPLY_POLL_S * 2**k) for k in (1, 2, 3)]


def test_a_superlink_that_stays_broken_fails_the_wait_after_its_retries() -> None:
    grid, clock = BusyGrid({1: 0}, busy=10**9), Clock()
    with pytest.raises(httpx.HTTPStatusError):
        collect_replies(grid, _messages([1]), timeout=math.inf, clock=clock, sleep=clock.sleep)
    assert grid.failed == PULL_RETRIES + 1
    assert max(clock.slept) == PULL_RETRY_CAP_S


def test_a_refused_pull_is_not_retried() -> None:
    grid, clock = BusyGrid({1: 0}, busy=1, status=403), Clock()
    with pytest.raises(httpx.HTTPStatusError):
        collect_replies(grid, _messages([1]), timeout=60, clock=clock, sleep=clock.sleep)
    assert grid.failed == 1
    assert clock.slept == []
