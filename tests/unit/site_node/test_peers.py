"""Pinned peers (site_node.peers): pins made only for the confirmed fingerprint, moved only
along signed rotations, and rosters checked against them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from concord_protocol.contract import RosterMember
from concord_protocol.fields import format_utc, utcnow
from concord_protocol.site_keys import format_fingerprint, sign_rotation
from site_node.crypto.sealing import SiteKeyPair
from site_node.peers import PeerError, PeerStore, check_roster, own_keys


def _entry(keys: SiteKeyPair) -> dict[str, str]:
    return {
        "signing_public_key": keys.signing_public_b64,
        "exchange_public_key": keys.exchange_public_b64,
    }


def test_a_pin_is_made_for_the_confirmed_fingerprint_only(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    b = SiteKeyPair.generate()
    fingerprint = own_keys("hospital-b", b).fingerprint
    peer = store.pin("hospital-b", format_fingerprint(fingerprint), _entry(b))
    assert peer.fingerprint == fingerprint
    assert peer.via == "pin"
    assert store.get("hospital-b") == peer
    assert os.stat(store.path).st_mode & 0o777 == 0o600


def test_the_directory_serving_other_keys_pins_nothing(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    real, served = SiteKeyPair.generate(), SiteKeyPair.generate()
    with pytest.raises(PeerError) as info:
        store.pin("hospital-b", own_keys("hospital-b", real).fingerprint, _entry(served))
    assert info.value.code == "peers.fingerprint_mismatch"
    assert "nothing was pinned" in info.value.message
    assert store.all() == {}


def test_an_altered_pin_file_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    b, other = SiteKeyPair.generate(), SiteKeyPair.generate()
    store.pin("hospital-b", own_keys("hospital-b", b).fingerprint, _entry(b))
    body = json.loads(store.path.read_text())
    body["peers"]["hospital-b"]["exchange_public_key"] = other.exchange_public_b64
    store.path.write_text(json.dumps(body))
    with pytest.raises(PeerError) as info:
        store.all()
    assert info.value.code == "peers.corrupt"
    store.path.write_text("{not json")
    with pytest.raises(PeerError):
        store.get("hospital-b")


class _History:
    """The two API calls :meth:`PeerStore.follow` makes, served from memory."""

    def __init__(self, rotations: list[Any]) -> None:
        self.rotations = rotations

    def request(self, method: str, path: str, **_: Any) -> Any:
        assert (method, path) == ("GET", "/api/v1/sites/hospital-b/keys/history")
        return [{"rotation": r.model_dump(mode="json")} for r in self.rotations]


def test_the_pin_follows_a_signed_rotation_and_nothing_else(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    old, new, impostor = (SiteKeyPair.generate() for _ in range(3))
    store.pin("hospital-b", own_keys("hospital-b", old).fingerprint, _entry(old))
    rotation = sign_rotation(
        site_id="hospital-b",
        previous=own_keys("hospital-b", old),
        previous_signing_key=old.signing_key,
        new_signing_key=new.signing_key,
        new_exchange_public_key=new.exchange_public_b64,
        rotated_at=format_utc(utcnow()),
    )
    # The directory shows the impostor's keys with the real rotation: refused, pin stays.
    result = store.follow([{"id": "hospital-b", **_entry(impostor)}], _History([rotation]))  # type: ignore[arg-type]
    assert result.refused == {"hospital-b": "peers.key_mismatch"}
    assert store.get("hospital-b").fingerprint == own_keys("hospital-b", old).fingerprint  # type: ignore[union-attr]
    # The directory shows the new keys and the rotation: the pin moves.
    result = store.follow([{"id": "hospital-b", **_entry(new)}], _History([rotation]))  # type: ignore[arg-type]
    assert result.rotated == {"hospital-b": own_keys("hospital-b", new).fingerprint}
    peer = store.get("hospital-b")
    assert peer is not None
    assert peer.via == "rotation"
    assert peer.history == (own_keys("hospital-b", old).fingerprint,)
    # The directory shows new keys without any rotation: refused.
    result = store.follow([{"id": "hospital-b", **_entry(impostor)}], _History([]))  # type: ignore[arg-type]
    assert result.refused == {"hospital-b": "peers.key_mismatch"}


def test_a_roster_is_checked_member_by_member(tmp_path: Path) -> None:
    store = PeerStore(tmp_path)
    me, b, c = (SiteKeyPair.generate() for _ in range(3))
    store.pin("hospital-b", own_keys("hospital-b", b).fingerprint, _entry(b))

    def member(site_id: str, keys: SiteKeyPair) -> RosterMember:
        return RosterMember(
            site_id=site_id, key_fingerprint=own_keys(site_id, keys).fingerprint, max_examples=9
        )

    own = own_keys("hospital-a", me)
    good = [member("hospital-a", me), member("hospital-b", b)]
    assert check_roster(good, site_id="hospital-a", own=own, peers=store.all()) == []
    bad = [member("hospital-a", c), member("hospital-b", c), member("hospital-c", c)]
    codes = [p.code for p in check_roster(bad, site_id="hospital-a", own=own, peers=store.all())]
    assert codes == ["roster.own_key_mismatch", "roster.key_mismatch", "roster.unpinned"]
    outside = [member("hospital-b", b)]
    codes = [
        p.code for p in check_roster(outside, site_id="hospital-a", own=own, peers=store.all())
    ]
    assert codes == ["roster.not_member"]


def test_only_keys_on_the_checked_rotation_path_are_kept_for_older_cosignatures(
    tmp_path: Path,
) -> None:
    """The server's key history may hold anything before the pin: a forged "earlier
    rotation" naming an attacker's key must not become a key this site trusts for old
    audit cosignatures. Only the pinned key and those reached by checked rotations are."""
    store = PeerStore(tmp_path)
    attacker, pinned, new = (SiteKeyPair.generate() for _ in range(3))

    def rotation(old: SiteKeyPair, to: SiteKeyPair) -> Any:
        return sign_rotation(
            site_id="hospital-b",
            previous=own_keys("hospital-b", old),
            previous_signing_key=old.signing_key,
            new_signing_key=to.signing_key,
            new_exchange_public_key=to.exchange_public_b64,
            rotated_at=format_utc(utcnow()),
        )

    store.pin("hospital-b", own_keys("hospital-b", pinned).fingerprint, _entry(pinned))
    forged_history = [rotation(attacker, pinned), rotation(pinned, new)]
    result = store.follow([{"id": "hospital-b", **_entry(new)}], _History(forged_history))  # type: ignore[arg-type]
    assert result.rotated == {"hospital-b": own_keys("hospital-b", new).fingerprint}
    peer = store.get("hospital-b")
    assert peer is not None
    assert peer.previous_signing_keys == (pinned.signing_public_b64,)
    assert attacker.signing_public_b64 not in peer.previous_signing_keys
