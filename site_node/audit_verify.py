"""``site-node audit verify --file``: check a consortium audit export with this site's own
trust, never the export's.

The keys are the ones hospital IT pinned: the server's head key
(``CONCORD_SITE_SERVER_HEAD_KEY`` or the witness's pin), the log's identity (likewise),
this site's own signing key and every pinned peer's (:mod:`site_node.peers`). On top of
the checks of :func:`concord_protocol.audit.verify.verify_export`, the export must contain
the last head this site cosigned, with the same root: an export cut short or rewritten
before that head fails even if every signature in it were re-made.
"""

from __future__ import annotations

from pathlib import Path

from concord_protocol.audit.export import AuditExport
from concord_protocol.audit.verify import VerificationReport, verify_export
from site_node.agent.sync import AgentError
from site_node.agent.witness import PINNED_KEY_FILE, PINNED_LOG_FILE, witnessed_head
from site_node.crypto.errors import CryptoError
from site_node.crypto.sealing import SiteKeyPair
from site_node.peers import PeerStore

__all__ = ["trusted_site_keys", "verify_export_as_site"]


def trusted_site_keys(
    state_dir: Path, site_id: str, keys: SiteKeyPair, keys_dir: Path | None = None
) -> dict[str, list[str]]:
    """This site's own signing keys and each pinned peer's, by site id, current key first:
    also the keys used before a rotation (a peer's, recorded when the agent followed it or
    IT re-pinned; this site's own, from ``<keys>/previous-*/``), which its older audit
    cosignatures verify with."""
    trusted = {
        peer_id: [peer.keys.signing_public_key, *peer.previous_signing_keys]
        for peer_id, peer in PeerStore(state_dir).all().items()
    }
    own = [keys.signing_public_b64]
    if keys_dir is not None:
        for previous in sorted(Path(keys_dir).glob("previous-*")):
            try:
                own.append(SiteKeyPair.load(previous).signing_public_b64)
            except CryptoError:
                continue  # a damaged old key cannot vouch for anything
    trusted[site_id] = list(dict.fromkeys(own))
    return trusted


def _pinned(state_dir: Path, configured: str | None, name: Path) -> str | None:
    if configured:
        return configured.strip()
    path = Path(state_dir) / name
    return path.read_text().strip() if path.is_file() else None


def verify_export_as_site(
    export: AuditExport,
    *,
    state_dir: Path,
    site_id: str,
    keys: SiteKeyPair,
    keys_dir: Path | None = None,
    server_head_key: str | None,
    audit_log_id: str | None,
    quorum: int | None,
) -> VerificationReport:
    """Verify ``export`` with the keys this site pinned (see the module docstring).

    Raises :class:`AgentError` ``agent.no_server_key`` when no head key is configured or
    pinned yet (run the agent once, or set ``CONCORD_SITE_SERVER_HEAD_KEY``).
    """
    server_key = _pinned(state_dir, server_head_key, PINNED_KEY_FILE)
    if server_key is None:
        raise AgentError(
            "no trusted tree-head key yet",
            code="agent.no_server_key",
            hint="Set CONCORD_SITE_SERVER_HEAD_KEY, or let `site-node run` pin it first.",
        )
    witnessed = witnessed_head(state_dir)
    return verify_export(
        export,
        trusted_server_key=server_key,
        trusted_site_keys=trusted_site_keys(state_dir, site_id, keys, keys_dir),
        quorum=quorum,
        log_id=_pinned(state_dir, audit_log_id, PINNED_LOG_FILE),
        expected_size=witnessed.tree_size if witnessed else None,
        expected_root=witnessed.root_hash if witnessed else None,
    )
