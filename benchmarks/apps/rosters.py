"""Keys and the roster for a benchmark's sites, which have no consortium server to enrol with.

Each site gets its own signing and exchange keys in ``<state_dir>/keys`` (kept if already
there), and the contract's roster names their fingerprints, as the server's roster would.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from concord_protocol.contract import RosterMember
from concord_protocol.site_keys import site_key_fingerprint
from site_node.crypto.sealing import SIGNING_KEY_FILE, SiteKeyPair

__all__ = ["keyed_roster"]


def keyed_roster(sites: Iterable[tuple[str, Path]], *, max_examples: int) -> list[RosterMember]:
    """The roster of ``(site_id, state_dir)`` pairs, sorted, each site given its keys."""
    members = []
    for site_id, state_dir in sites:
        keys_dir = state_dir / "keys"
        if (keys_dir / SIGNING_KEY_FILE).exists():
            keys = SiteKeyPair.load(keys_dir)
        else:
            keys = SiteKeyPair.generate()
            keys.save(keys_dir)
        members.append(
            RosterMember(
                site_id=site_id,
                key_fingerprint=site_key_fingerprint(
                    keys.signing_public_b64, keys.exchange_public_b64
                ),
                max_examples=max_examples,
            )
        )
    return sorted(members, key=lambda m: m.site_id)
