"""Bytes and messages on the wire, per site and round: the comparison ServerApp's meter.

:class:`MeteredGrid` wraps the grid Flower gives a ServerApp and counts every message each
way as Flower 1.41 ships it (:func:`~benchmarks.apps.grids.wire_bytes`: the deflated sizes
of the message's objects, ``Message``, ``RecordDict``, records, array chunks; no gRPC/TLS
framing), per site and round, by message type, the way ``benchmarks/aggregation_compare.py``
measures them. :class:`RoundTraffic` is one round's figures; the comparison ServerApp writes
them to ``traffic.json`` in its records dir (:func:`write_traffic`, :func:`read_traffic`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from benchmarks.apps.grids import ForwardingGrid, wire_bytes
from benchmarks.apps.records import write_json
from consortium_server.federation.serverapp import exchange, site_of

__all__ = [
    "TRAFFIC_FILE",
    "MeteredGrid",
    "RoundTraffic",
    "Traffic",
    "read_traffic",
    "write_traffic",
]

TRAFFIC_FILE = "traffic.json"


@dataclass
class Traffic:
    """Bytes each way and messages (site's view: ``sent`` is site -> server, ``received``
    and ``messages`` server -> site)."""

    sent: int = 0
    received: int = 0
    messages: int = 0

    def add(self, other: Traffic) -> None:
        """Add ``other`` into this one."""
        self.sent += other.sent
        self.received += other.received
        self.messages += other.messages


@dataclass
class RoundTraffic:
    """What one round put on the wire, per site (or ``node-<id>``) and message type."""

    round_number: int
    per_site: dict[str, dict[str, Traffic]] = field(default_factory=dict)
    waves: int = 0  # send_and_receive calls (server -> sites -> server exchanges)
    wait_seconds: float = 0.0  # inside send_and_receive (sites working, transport)
    metering_seconds: float = 0.0  # spent measuring (included in the round's wall time)

    def site_total(self, site: str) -> Traffic:
        """One site's traffic over every message type."""
        total = Traffic()
        for traffic in self.per_site.get(site, {}).values():
            total.add(traffic)
        return total

    def as_record(self) -> dict[str, Any]:
        """JSON-ready form (``per_site[site][type] = {sent, received, messages}``)."""
        return {
            "round_number": self.round_number,
            "waves": self.waves,
            "wait_seconds": self.wait_seconds,
            "metering_seconds": self.metering_seconds,
            "per_site": {
                site: {kind: vars(t).copy() for kind, t in sorted(kinds.items())}
                for site, kinds in sorted(self.per_site.items())
            },
        }

    @classmethod
    def from_record(cls, body: dict[str, Any]) -> RoundTraffic:
        """Inverse of :meth:`as_record`."""
        return cls(
            round_number=int(body["round_number"]),
            per_site={
                site: {kind: Traffic(**t) for kind, t in kinds.items()}
                for site, kinds in body["per_site"].items()
            },
            waves=int(body["waves"]),
            wait_seconds=float(body["wait_seconds"]),
            metering_seconds=float(body["metering_seconds"]),
        )


class MeteredGrid(ForwardingGrid):
    """A Flower ``Grid`` that forwards to ``grid`` and meters every ``send_and_receive``.

    Each message's bytes are counted for its destination node (``received``), each reply's
    for the node that sent it (``sent``), after the exchange (nothing is measured while
    messages are in flight). Nodes are named by the ``site`` record of their replies once
    known. ``observer``, if set, sees every reply. :meth:`take` hands over a round's figures
    and starts the next. Direct ``push_messages``/``pull_messages`` calls are forwarded
    unmetered (the round loops here use ``send_and_receive`` only).
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.node_sites: dict[int, str] = {}
        self.observer: Callable[[Message], None] | None = None
        self._per_node: dict[int, dict[str, Traffic]] = {}
        self._waves = 0
        self._wait_s = 0.0
        self._metering_s = 0.0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forward the exchange, then count every message and reply."""
        outgoing = list(messages)
        t0 = time.perf_counter()
        replies = exchange(self.inner, outgoing, timeout=timeout)  # the ServerApp's polling
        t1 = time.perf_counter()
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in outgoing}
        by_id.pop("", None)
        for msg in outgoing:
            traffic = self._traffic(msg.metadata.dst_node_id, msg.metadata.message_type)
            traffic.received += wire_bytes(msg)
            traffic.messages += 1
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            self._traffic(node, reply.metadata.message_type).sent += wire_bytes(reply)
            site = site_of(reply)
            if site is not None:
                self.node_sites[node] = site
            if self.observer is not None:
                self.observer(reply)
        self._waves += 1
        self._wait_s += t1 - t0
        self._metering_s += time.perf_counter() - t1
        return replies

    def _traffic(self, node: int, kind: str) -> Traffic:
        return self._per_node.setdefault(node, {}).setdefault(kind, Traffic())

    @property
    def wait_seconds(self) -> float:
        """Seconds spent inside ``send_and_receive`` since the last :meth:`take`."""
        return self._wait_s

    def take(self, round_number: int) -> RoundTraffic:
        """The figures since the last call, named by site where known; then reset."""
        per_site: dict[str, dict[str, Traffic]] = {}
        for node, kinds in self._per_node.items():
            label = self.node_sites.get(node, f"node-{node}")
            target = per_site.setdefault(label, {})
            for kind, traffic in kinds.items():
                target.setdefault(kind, Traffic()).add(traffic)
        out = RoundTraffic(round_number, per_site, self._waves, self._wait_s, self._metering_s)
        self._per_node, self._waves, self._wait_s, self._metering_s = {}, 0, 0.0, 0.0
        return out


def write_traffic(records_dir: Path, method: str, rounds: Iterable[RoundTraffic]) -> None:
    """Write every round's traffic so far to ``records_dir/traffic.json``."""
    body = {"method": method, "rounds": [t.as_record() for t in rounds]}
    write_json(records_dir / TRAFFIC_FILE, body)


def read_traffic(records_dir: Path) -> list[RoundTraffic]:
    """The per-round traffic the comparison ServerApp wrote (empty if none)."""
    path = records_dir / TRAFFIC_FILE
    if not path.is_file():
        return []
    body = json.loads(path.read_text())
    return [RoundTraffic.from_record(r) for r in body["rounds"]]
