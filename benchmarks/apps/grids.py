"""Grids for measuring and for running rounds in process: the benchmarks' and tests' bases.

:class:`ForwardingGrid` passes every ``Grid`` call to the grid Flower gave the ServerApp;
a subclass overrides what it measures (``send_and_receive``, ``create_message``). Used by
the comparison ServerApp's meter (:mod:`benchmarks.apps.metering`) and the scale benchmark
(``benchmarks/scale.py``). :func:`wire_bytes` is how both count a message.

:class:`LocalGrid` is the part of a ``Grid`` the round loops use, with no SuperLink: it
builds messages for a fixed set of node ids, and a subclass's ``send_and_receive`` hands
them to nodes in this process (``tests/support/inprocess_grid.py``,
``benchmarks/aggregation_compare.py``). Benchmark and test code only: the product's
ServerApp runs on the grid Flower gives it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

__all__ = ["ForwardingGrid", "LocalGrid", "wire_bytes"]


def wire_bytes(msg: Message) -> int:
    """Bytes of ``msg`` as Flower 1.41 pushes it: its deflated objects, each once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class ForwardingGrid(Grid):
    """Every ``Grid`` call goes to ``inner``, unchanged."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Any) -> None:
        """Forwarded (Flower's runtime sets the run, not the ServerApp)."""
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        """Forwarded."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forwarded."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forwarded."""
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Forwarded."""
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.send_and_receive(messages, timeout=timeout)


class LocalGrid:
    """Messages for the nodes ``node_ids``, delivered by a subclass's ``send_and_receive``."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        """The nodes, as given."""
        return list(self.node_ids)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message as Flower's grid builds it (no run or TTL bookkeeping)."""
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )
