"""Failure drills: real processes (SuperLink, SuperNodes, site agents, the consortium server,
PostgreSQL, the test OIDC provider) that are killed, corrupted or restarted on purpose."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
