"""The Flower app bundle of a Concord study, which both roles hash.

The bundle (``app/pyproject.toml``) holds configuration only: the ServerApp and ClientApp
it names are the installed ``consortium_server`` and ``site_node`` packages, never code
shipped in the bundle. The consortium server runs ``flwr run`` on :data:`APP_DIR`; a site
accepts a run only when the bundle it is sent hashes to :func:`bundle_hash` of its own copy
(:mod:`site_node.federation.processes`). Flower builds bundles deterministically, so both
sides compute the same hash from the same files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["APP_DIR", "CLIENTAPP_REF", "SERVERAPP_REF", "bundle_hash"]

#: The Flower app directory (``pyproject.toml`` only) shipped with this package.
APP_DIR = Path(__file__).resolve().parent / "app"
#: The components the bundle names (the installed packages' apps).
SERVERAPP_REF = "consortium_server.federation.serverapp:app"
CLIENTAPP_REF = "site_node.federation.clientapp:app"


def bundle_hash(app_dir: Path = APP_DIR) -> str:
    """SHA-256 of the FAB that ``flwr run`` builds from ``app_dir``."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()
