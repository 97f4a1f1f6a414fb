"""What the site runs for each message: the guarded ``flwr-clientapp`` of one state dir.

The runner (:mod:`~site_node.federation.warm.runner`) runs whatever target it is given and
imports no ClientApp code itself; this is the site's target, given to it by the entry point
(:mod:`site_node.federation.warm.__main__`) and run in-process by the shim when the runner
cannot be reached.

:func:`~site_node.federation.processes.guarded_clientapp_main` is imported on the first
call, not here: the runner binds its socket before it imports anything heavy (a shim that
connects early waits in the backlog), and the shim imports only the standard library. In a
warm worker the module is already loaded (the runner preloads it), so the import is a
lookup.
"""

from __future__ import annotations

from pathlib import Path

from site_node.federation.warm.protocol import Target

__all__ = ["clientapp_target"]


def clientapp_target(state_dir: Path) -> Target:
    """The guarded ``flwr-clientapp`` for ``state_dir``, as a target taking its arguments."""

    def run(argv: list[str]) -> None:
        from concord_protocol.flower_polling import shorten_object_pulls
        from site_node.federation.processes import guarded_clientapp_main

        # The ClientApp pulls its message from the SuperNode, which may still be fetching
        # it: retry after 50 ms, not Flower's 1 s.
        shorten_object_pulls()
        guarded_clientapp_main(state_dir, argv)

    return run
