"""Where the Cedar schema and the policies shipped with Concord are.

In a checkout (an editable install, the tests, the demo) they are the repository's
``policies/``; an installed distribution (a wheel, the container images) carries them as
data files in ``<prefix>/share/policies`` (``pyproject.toml``, ``[tool.setuptools.data-files]``).
Both roles start from them: the server seeds the consortium's set from ``consortium/``, and
a site copies the templates of ``sites/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from concord_protocol.policy.engine import SCHEMA_FILENAME

__all__ = ["shipped_policies"]


def shipped_policies() -> Path:
    """The shipped policy directory (``schema.cedarschema``, ``consortium/``, ``sites/``)."""
    candidates = (
        Path(__file__).resolve().parents[2] / "policies",
        Path(sys.prefix) / "share" / "policies",
    )
    for candidate in candidates:
        if (candidate / SCHEMA_FILENAME).is_file():
            return candidate
    raise FileNotFoundError(
        "the shipped policies are missing: neither "
        + " nor ".join(str(c) for c in candidates)
        + f" holds {SCHEMA_FILENAME}"
    )
