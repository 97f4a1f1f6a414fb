"""A stand-in for Flower's Grid: every node runs the real site ClientApp in this process,
with its own context, as a SuperNode would; for tests of the round loop without processes.

The ClientApp is Concord's (``site_node.federation.clientapp:app``) unless a test gives
another (the comparison ClientApp, ``benchmarks.apps.compare_client:app``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from benchmarks.apps.grids import LocalGrid
from site_node.errors import MessageRefusedError
from site_node.federation.clientapp import app as concord_client_app
from tests.support.flower import SiteFixture

__all__ = ["InProcessGrid", "flower_task_identity", "site_contexts"]


@contextmanager
def flower_task_identity() -> Iterator[None]:
    """Flower stamps messages with the process's run, node and task ids, which its runtimes
    set; set them for an in-process run and put them back afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: TaskIdentity.__dict__.get(k) for k in ("_run_id", "_node_id", "_task_id")}
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(TaskIdentity, key, value)


def site_contexts(
    sites: Sequence[SiteFixture], run_config: Mapping[str, str | int | float | bool]
) -> dict[int, Context]:
    """Each site's Flower context (node ids 100, 101, ...) as its SuperNode would make it."""
    return {
        100 + i: Context(
            run_id=1,
            node_id=100 + i,
            node_config={
                "site-id": site.site_id,
                "state-dir": str(site.state_dir),
                "datasets-file": str(site.datasets_file),
            },
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i, site in enumerate(sites)
    }


class InProcessGrid(LocalGrid):
    """A Grid whose nodes run ``client_app`` (default: Concord's site ClientApp) in this
    process (``drop`` nodes never answer). A site's refusal (``MessageRefusedError``)
    becomes an error reply, as a SuperNode sends it. Subclasses may alter replies in
    :meth:`reply`."""

    def __init__(
        self,
        contexts: dict[int, Context],
        *,
        drop: Iterable[int] = (),
        client_app: ClientApp | None = None,
    ) -> None:
        super().__init__(contexts)
        self.contexts = contexts
        self.drop = set(drop)
        self.client_app = client_app or concord_client_app
        self.sent: list[str] = []

    def reply(self, node: int, msg: Message, reply: Message) -> Message:
        """The reply node ``node`` sends for ``msg`` (unchanged here)."""
        return reply

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg.metadata.message_type)
            node = msg.metadata.dst_node_id
            if node in self.drop:
                continue
            try:
                answer = self.client_app(msg, self.contexts[node])
            except MessageRefusedError as exc:
                # What a SuperNode does when the ClientApp raises: an error reply whose
                # reason carries the refusal's code.
                answer = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)),
                    reply_to=msg,
                )
            replies.append(self.reply(node, msg, answer))
        return replies
