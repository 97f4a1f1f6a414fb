"""``python -m site_node.federation.supernode_main ARGS``: Flower's ``flower-supernode``,
polling the SuperLink every :data:`POLL_S` seconds instead of every 3.

Flower 1.41's SuperNode main loop (``flwr.supernode.start_client_internal``) sleeps a fixed
3 s after a pull that found no message and 0.5 s while it waits for a ClientApp's reply,
and retries an object it cannot pull yet after 1 s, doubling; none is an option. With the
ServerApp's own 3 s between pulls they were most of the 6-7 s a round's message wave took
(``benchmarks/round_timing.py``). This entry point caps that module's sleeps at
:data:`POLL_S`, shortens the object pulls (:mod:`concord_protocol.flower_polling`), then
runs Flower's own CLI unchanged: same arguments, same checks, same process
(``site-node supernode`` execs it in the container).

The cost is one authenticated ``PullMessages`` request per :data:`POLL_S` per idle
SuperNode at the SuperLink (five a second per site at 0.2 s).
"""

from __future__ import annotations

import sys

from concord_protocol.flower_polling import cap_module_sleeps, shorten_object_pulls

__all__ = ["POLL_S", "SUPERNODE_LOOP", "main", "patch_polling"]

#: The longest a SuperNode sleeps between two pulls, or while waiting for a reply.
POLL_S = 0.2

#: The module of Flower's SuperNode main loop.
SUPERNODE_LOOP = "flwr.supernode.start_client_internal"


def patch_polling(poll_s: float = POLL_S) -> None:
    """Shorten the SuperNode's waits in this process (before Flower starts)."""
    cap_module_sleeps(SUPERNODE_LOOP, poll_s)
    shorten_object_pulls()


def main() -> None:
    """Run ``flower-supernode`` with :data:`POLL_S` polling (the arguments are Flower's)."""
    patch_polling()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # argparse names the program after argv[0]
    flower_supernode()


if __name__ == "__main__":
    main()
