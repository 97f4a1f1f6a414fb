"""Site keys and rosters for tests that build study contracts without a consortium server.

Each test site has *deterministic* keys (:func:`site_keys`, derived from its id), so that a
contract built anywhere in a test names the same fingerprints the site's own key files
give (:func:`tests.support.flower.make_site` writes them), and pins can be made without a
directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from concord_protocol.contract import RosterMember, StudyContract, StudyDraft
from site_node.crypto.sealing import SiteKeyPair
from site_node.peers import PeerStore, own_keys

__all__ = [
    "contract_of",
    "pin_all",
    "roster",
    "site_keys",
    "site_of_dataset",
    "write_site_keys",
]


def site_keys(site_id: str) -> SiteKeyPair:
    """The test keys of ``site_id`` (the same on every call)."""
    seed = hashlib.sha256(f"concord-test-site/{site_id}".encode()).digest()
    return SiteKeyPair(
        Ed25519PrivateKey.from_private_bytes(seed),
        X25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()),
    )


def roster(site_ids: Iterable[str], *, max_examples: int = 10_000) -> list[RosterMember]:
    """A roster of ``site_ids`` (sorted) with their test keys' fingerprints."""
    return [
        RosterMember(
            site_id=sid,
            key_fingerprint=own_keys(sid, site_keys(sid)).fingerprint,
            max_examples=max_examples,
        )
        for sid in sorted(set(site_ids))
    ]


def write_site_keys(state_dir: Path, site_id: str) -> SiteKeyPair:
    """Write ``site_id``'s test keys to ``state_dir/keys`` (no-op if already there)."""
    keys = site_keys(site_id)
    if not (state_dir / "keys" / "signing_key.pem").exists():
        keys.save(state_dir / "keys")
    return keys


def pin_all(state_dir: Path, site_id: str, peers: Iterable[str]) -> None:
    """Pin every other site of ``peers`` at ``site_id`` with its test keys."""
    store = PeerStore(state_dir)
    for peer in peers:
        if peer == site_id:
            continue
        keys = site_keys(peer)
        store.pin(
            peer,
            own_keys(peer, keys).fingerprint,
            {
                "signing_public_key": keys.signing_public_b64,
                "exchange_public_key": keys.exchange_public_b64,
            },
        )


def site_of_dataset(dataset_id: str) -> str:
    """The test site of a test dataset: ``bc-a`` -> ``hospital-a`` (``img-hospital-b`` too)."""
    tail = dataset_id.rsplit("-", 1)[-1]
    return f"hospital-{tail}"


def contract_of(draft: dict[str, Any], *, max_examples: int = 10_000) -> StudyContract:
    """A draft (:func:`tests.support.world.study_contract`) completed as the server would:
    the roster of its datasets' test sites, the first one generating the key."""
    sites = sorted({site_of_dataset(d) for d in draft["datasets"]})
    return StudyDraft.model_validate(draft).complete(
        roster(sites, max_examples=max_examples), sites[0]
    )
