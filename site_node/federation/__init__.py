"""Federation on the site side: the Flower ClientApp, its contract guard, local approvals.

* :mod:`site_node.federation.clientapp`: ``app``, the ClientApp (DP training, CKKS updates).
* :mod:`site_node.federation.mods`: :class:`ContractGuardMod`.
* :mod:`site_node.federation.approvals`: :class:`ApprovalStore` (approved contract hashes,
  study keys, accepted app bundles) under the site's state dir.
* :mod:`site_node.federation.processes`: start a SuperNode whose ClientApp runner refuses
  any app bundle the site does not allow.
* ``app/``: the Flower app bundle directory (configuration only).

Imports are lazy here so that ``import site_node.federation`` does not pull in torch.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["APP_DIR"]

#: The Flower app directory (``pyproject.toml`` only) shipped with this package.
APP_DIR = Path(__file__).resolve().parent / "app"
