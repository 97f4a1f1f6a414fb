"""Keys and the roster for a benchmark's sites, which have no consortium server to enrol with.

Each site gets its own signing and exchange keys in ``<state_dir>/keys`` (kept if already
there), and the contract's roster names their fingerprints, as the server's roster would.
Every site pins every other one (the benchmark's hospitals all run on this machine, so the
out-of-band fingerprint check is reading the other's key file): sites check the signed
contributions of each aggregate with their pins.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from concord_protocol.contract import RosterMember
from concord_protocol.site_keys import site_key_fingerprint
from site_node.crypto.sealing import SIGNING_KEY_FILE, SiteKeyPair
from site_node.peers import PeerStore

__all__ = ["keyed_roster"]


def keyed_roster(sites: Iterable[tuple[str, Path]], *, max_examples: int) -> list[RosterMember]:
    """The roster of ``(site_id, state_dir)`` pairs, sorted, each site given its keys."""
    members = []
    pairs = list(sites)
    held: dict[str, tuple[Path, SiteKeyPair]] = {}
    for site_id, state_dir in pairs:
        keys_dir = state_dir / "keys"
        if (keys_dir / SIGNING_KEY_FILE).exists():
            keys = SiteKeyPair.load(keys_dir)
        else:
            keys = SiteKeyPair.generate()
            keys.save(keys_dir)
        held[site_id] = (state_dir, keys)
        members.append(
            RosterMember(
                site_id=site_id,
                key_fingerprint=site_key_fingerprint(
                    keys.signing_public_b64, keys.exchange_public_b64
                ),
                max_examples=max_examples,
            )
        )
    for site_id, (state_dir, _) in held.items():
        store = PeerStore(state_dir)
        for peer, (_, peer_keys) in held.items():
            if peer != site_id:
                directory = {
                    "signing_public_key": peer_keys.signing_public_b64,
                    "exchange_public_key": peer_keys.exchange_public_b64,
                }
                fingerprint = site_key_fingerprint(
                    peer_keys.signing_public_b64, peer_keys.exchange_public_b64
                )
                store.pin(peer, fingerprint, directory)
    return sorted(members, key=lambda m: m.site_id)
