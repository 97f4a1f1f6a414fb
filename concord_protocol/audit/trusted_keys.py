"""The site-keys file a verifier trusts: each site's Ed25519 signing key(s), given out of band.

An audit export names the sites' keys too, but whoever rewrote the log could have replaced
them along with every cosignature, so ``consortium audit verify --site-keys FILE`` and
``site-node audit verify`` check cosignatures only with keys from a file like this one:
a JSON object from site id to the base64 raw public key, or to a list of them (a site
that rotated its key signed older cosignatures with an earlier one)::

    {"hospital-a": "MCowBQYDK2VwAyEA...", "hospital-b": ["<current>", "<before rotation>"]}

``site-node peers export-keys FILE`` writes one from the site's own key and the peers it
pinned (each confirmed by fingerprint with the peer's IT).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from concord_protocol.audit.heads import decode_public_key
from concord_protocol.errors import AuditVerificationError

__all__ = ["SiteKeysError", "load_site_keys", "write_site_keys"]


class SiteKeysError(ValueError):
    """The site-keys file cannot be used; the message says where and why."""


def load_site_keys(path: Path) -> dict[str, list[str]]:
    """Read a site-keys file; :class:`SiteKeysError` if it is missing or malformed (an
    empty object is refused too: it would make every cosignature unknown)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteKeysError(f"no such site-keys file: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SiteKeysError(f"{path} is not a JSON site-keys file: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise SiteKeysError(f"{path} must be a JSON object from site id to signing key(s)")
    keys: dict[str, list[str]] = {}
    for site_id, value in raw.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise SiteKeysError(f"{path}: {site_id!r} must map to a key or a list of keys")
        for key in values:
            try:
                decode_public_key(key if isinstance(key, str) else "")
            except AuditVerificationError:
                raise SiteKeysError(
                    f"{path}: a key of {site_id!r} is not a base64 raw Ed25519 public key"
                ) from None
        keys[str(site_id)] = [str(k) for k in values]
    return keys


def write_site_keys(path: Path, keys: Mapping[str, str | Sequence[str]]) -> None:
    """Write ``keys`` as a site-keys file (sorted, one site per line)."""
    body = {s: (k if isinstance(k, str) else list(k)) for s, k in sorted(keys.items())}
    Path(path).write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
