"""Site key fingerprints and signed key rotations (concord_protocol.site_keys)."""

from __future__ import annotations

import pytest

from concord_protocol.site_keys import (
    KeyRotation,
    PinnedKeys,
    SignatureError,
    follow_rotations,
    format_fingerprint,
    parse_fingerprint,
    sign_rotation,
    site_key_fingerprint,
)
from site_node.crypto.sealing import SiteKeyPair


def _pinned(site_id: str, keys: SiteKeyPair) -> PinnedKeys:
    return PinnedKeys(site_id, keys.signing_public_b64, keys.exchange_public_b64)


def _rotate(site_id: str, old: SiteKeyPair, new: SiteKeyPair) -> KeyRotation:
    return sign_rotation(
        site_id=site_id,
        previous=_pinned(site_id, old),
        previous_signing_key=old.signing_key,
        new_signing_key=new.signing_key,
        new_exchange_public_key=new.exchange_public_b64,
        rotated_at="2026-12-02T08:00:00.000000Z",
    )


def test_the_fingerprint_covers_both_keys() -> None:
    a, b = SiteKeyPair.generate(), SiteKeyPair.generate()
    base = site_key_fingerprint(a.signing_public_b64, a.exchange_public_b64)
    assert site_key_fingerprint(a.signing_public_b64, b.exchange_public_b64) != base
    assert site_key_fingerprint(b.signing_public_b64, a.exchange_public_b64) != base
    assert len(base) == 64


def test_a_fingerprint_reads_back_however_it_was_typed() -> None:
    keys = SiteKeyPair.generate()
    fp = site_key_fingerprint(keys.signing_public_b64, keys.exchange_public_b64)
    shown = format_fingerprint(fp)
    assert len(shown.split()) == 16
    assert parse_fingerprint(shown) == fp
    assert parse_fingerprint(shown.upper().replace(" ", ":")) == fp
    assert parse_fingerprint(fp[:32] + "-" + fp[32:]) == fp


@pytest.mark.parametrize("text", ["", "abc", "g" * 64, "0" * 63, "0" * 65])
def test_anything_else_is_not_a_fingerprint(text: str) -> None:
    with pytest.raises(SignatureError) as info:
        parse_fingerprint(text)
    assert info.value.code == "keys.fingerprint_invalid"


def test_a_malformed_public_key_has_no_fingerprint() -> None:
    with pytest.raises(SignatureError) as info:
        site_key_fingerprint("not base64!", "AAAA")
    assert info.value.code == "signature.key_invalid"


def test_a_chain_of_rotations_leads_from_the_pinned_keys_to_the_newest() -> None:
    k0, k1, k2 = (SiteKeyPair.generate() for _ in range(3))
    chain = [_rotate("hospital-a", k0, k1), _rotate("hospital-a", k1, k2)]
    assert follow_rotations(_pinned("hospital-a", k0), chain) == _pinned("hospital-a", k2)
    # a peer that pinned k1 already skips the older rotation
    assert follow_rotations(_pinned("hospital-a", k1), chain) == _pinned("hospital-a", k2)
    # and one that is up to date stays
    assert follow_rotations(_pinned("hospital-a", k2), chain) == _pinned("hospital-a", k2)


def test_a_rotation_signed_by_another_key_breaks_the_chain() -> None:
    k0, k1, k2, stranger = (SiteKeyPair.generate() for _ in range(4))
    good = _rotate("hospital-a", k0, k1)
    forged = _rotate("hospital-a", k1, k2).model_copy(
        update={"previous_signature": stranger.signing_key.sign(b"x")}
    )
    with pytest.raises(SignatureError) as info:
        follow_rotations(_pinned("hospital-a", k0), [good, forged])
    assert info.value.code == "signature.invalid"


def test_every_signed_field_counts() -> None:
    k0, k1, other = (SiteKeyPair.generate() for _ in range(3))
    rotation = _rotate("hospital-a", k0, k1)
    swapped = rotation.model_copy(update={"exchange_public_key": other.exchange_public_b64})
    with pytest.raises(SignatureError):
        swapped.verify(_pinned("hospital-a", k0))


def test_a_rotation_of_another_site_is_refused() -> None:
    k0, k1 = SiteKeyPair.generate(), SiteKeyPair.generate()
    rotation = _rotate("hospital-b", k0, k1)
    with pytest.raises(SignatureError) as info:
        rotation.verify(_pinned("hospital-a", k0))
    assert info.value.code == "keys.rotation_invalid"
