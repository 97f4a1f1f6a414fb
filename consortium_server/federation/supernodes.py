"""The SuperLink's list of SuperNode keys follows the consortium's list of sites.

Only SuperNodes whose public key is registered with the SuperLink may connect (SuperNode
authentication). Enrolling a site (``POST /api/v1/sites``) registers the key it was
enrolled with; revoking it (``POST /api/v1/sites/{id}/revoke``) unregisters that SuperNode,
so a revoked hospital is cut off from the federation as well as from the API.

:class:`FlwrSuperNodeRegistry` calls the configured SuperLink's Control API (``RegisterNode``
/ ``UnregisterNode``, as ``flwr supernode register|unregister`` would) over mutual TLS with
the server's client certificate (:mod:`~consortium_server.federation.control_client`):
Control is reachable by the consortium server only, so nobody else can add a node to the
federation. Tests pass their own :class:`SuperNodeRegistry`. A server without a SuperLink
has none, and the operator registers keys by hand.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

from concord_protocol.processes import FlowerProcessError
from consortium_server.errors import DomainError
from consortium_server.federation.processes import (
    SuperLinkHandle,
    register_supernode,
    unregister_supernode,
)

__all__ = ["FlwrSuperNodeRegistry", "SuperLinkRefusedError", "SuperNodeRegistry"]


class SuperLinkRefusedError(DomainError):
    """The SuperLink did not register or unregister a key (502, nothing changed)."""

    code = "federation.superlink_error"


class SuperNodeRegistry(Protocol):
    """Registers SuperNode public keys with the SuperLink."""

    def register(self, public_key: str, *, name: str) -> str:
        """Register an OpenSSH EC public key; the SuperLink's node id for it."""
        ...

    def unregister(self, node_id: str) -> None:
        """Remove a registered SuperNode by its node id."""
        ...


class FlwrSuperNodeRegistry:
    """:class:`SuperNodeRegistry` through the SuperLink's Control API (``RegisterNode``)."""

    def __init__(self, link: SuperLinkHandle) -> None:
        self._link = link

    def register(self, public_key: str, *, name: str) -> str:
        """See :meth:`SuperNodeRegistry.register`; raises :class:`SuperLinkRefusedError`."""
        with tempfile.TemporaryDirectory(prefix="concord-supernode-") as tmp:
            key_file = Path(tmp) / f"{name}.pub"
            key_file.write_text(public_key.strip() + "\n")
            try:
                body = register_supernode(self._link, key_file, name=name)
            except FlowerProcessError as exc:
                raise SuperLinkRefusedError(
                    f"The SuperLink did not register the SuperNode key of {name}: "
                    f"{_last_line(exc.detail) or exc}"
                ) from None
        node_id = body.get("node-id")
        if node_id is None:
            raise SuperLinkRefusedError("The SuperLink registered the key but gave no node id.")
        return str(node_id)

    def unregister(self, node_id: str) -> None:
        """See :meth:`SuperNodeRegistry.unregister`; raises :class:`SuperLinkRefusedError`."""
        try:
            unregister_supernode(self._link, node_id)
        except FlowerProcessError as exc:
            raise SuperLinkRefusedError(
                f"The SuperLink did not unregister SuperNode {node_id}: "
                f"{_last_line(exc.detail) or exc}"
            ) from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
