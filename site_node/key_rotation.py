"""Changing a site's signing and exchange keys without breaking its peers' pins.

``site-node keys rotate`` (:func:`rotate_keys`) makes new keys, signs a
:class:`~concord_protocol.site_keys.KeyRotation` with the old key and with the new one,
and posts it to the consortium server, which checks it, switches the site's directory entry
and audits it. Peers follow it on their next agent pass by checking both signatures from
the key they pinned (:meth:`site_node.peers.PeerStore.follow`), so nobody needs to re-pin.

The new keys are written to ``<keys>/pending/`` first and moved into place only after the
server took the rotation; the old ones are kept under ``<keys>/previous-<fingerprint>/``.
A rotation interrupted after the server took it (the server now names the pending keys) is
completed by running the command again. The SuperNode key does not change.
"""

from __future__ import annotations

import os
from pathlib import Path

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.fields import format_utc, utcnow
from concord_protocol.site_keys import KeyRotation, sign_rotation, site_key_fingerprint
from site_node.crypto.sealing import EXCHANGE_KEY_FILE, SIGNING_KEY_FILE, SiteKeyPair
from site_node.peers import own_keys

__all__ = ["PENDING_DIR", "rotate_keys"]

PENDING_DIR = "pending"


def _swap(keys_dir: Path, old_fingerprint: str) -> None:
    """Move the current key files aside and the pending ones into place."""
    previous = keys_dir / f"previous-{old_fingerprint[:16]}"
    previous.mkdir(mode=0o700, exist_ok=True)
    for name in (SIGNING_KEY_FILE, EXCHANGE_KEY_FILE):
        os.replace(keys_dir / name, previous / name)
    for name in (SIGNING_KEY_FILE, EXCHANGE_KEY_FILE):
        os.replace(keys_dir / PENDING_DIR / name, keys_dir / name)
    (keys_dir / PENDING_DIR).rmdir()


def rotate_keys(api: ConsortiumClient, *, site_id: str, keys_dir: Path) -> KeyRotation:
    """Rotate this site's keys (see the module); returns the rotation the server took.

    Raises :class:`ApiError` when the server refuses it (the pending keys stay, and the
    current keys remain in use).
    """
    current = SiteKeyPair.load(keys_dir)
    pending_dir = keys_dir / PENDING_DIR
    if (pending_dir / SIGNING_KEY_FILE).is_file():
        new = SiteKeyPair.load(pending_dir)
    else:
        new = SiteKeyPair.generate()
        new.save(pending_dir, overwrite=True)
    previous = own_keys(site_id, current)
    rotation = sign_rotation(
        site_id=site_id,
        previous=previous,
        previous_signing_key=current.signing_key,
        new_signing_key=new.signing_key,
        new_exchange_public_key=new.exchange_public_b64,
        rotated_at=format_utc(utcnow()),
    )
    try:
        api.request("POST", f"/api/v1/sites/{site_id}/keys", json=rotation.model_dump(mode="json"))
    except ApiError as exc:
        if exc.code != "keys.rotation_invalid":
            raise
        entry = api.request("GET", f"/api/v1/sites/{site_id}")
        served = site_key_fingerprint(
            str(entry["signing_public_key"]), str(entry["exchange_public_key"])
        )
        if served != rotation.fingerprint:  # not an interrupted earlier run of this rotation
            raise
    _swap(keys_dir, previous.fingerprint)
    return rotation
