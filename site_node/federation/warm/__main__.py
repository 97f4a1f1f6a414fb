"""``python -m site_node.federation.warm --state-dir DIR [--socket PATH]``: the site's runner.

:func:`~site_node.federation.processes.start_supernode` and ``site-node supernode`` start
this next to the SuperNode; ``site-node clientapp-runner`` runs it on its own. It is the one
place that joins the generic runner to the site's guarded ClientApp
(:func:`~site_node.federation.warm.target.clientapp_target`), so that neither the runner
nor :mod:`site_node.federation.processes` (which starts this) imports the other.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from site_node.federation.warm.runner import configure_logging, serve_site
from site_node.federation.warm.target import clientapp_target

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the guarded ``flwr-clientapp`` of ``--state-dir`` until SIGTERM."""
    parser = argparse.ArgumentParser(description="The site's warm ClientApp runner.")
    parser.add_argument("--state-dir", type=Path, required=True, help="The site's state dir.")
    parser.add_argument("--socket", type=Path, default=None, help="Socket path.")
    args = parser.parse_args(argv)
    configure_logging()
    serve_site(args.state_dir, clientapp_target(args.state_dir), args.socket)


if __name__ == "__main__":
    main()
