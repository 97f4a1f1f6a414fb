"""The peers this site trusts: their public keys, pinned by hospital IT, never fetched.

The consortium server's site directory (``GET /api/v1/sites``) is where a site *finds* a
peer's keys, not why it believes them: a server that swapped them could read every study
key. So a peer's keys count only once pinned here (``site-node peers pin <site-id>
<fingerprint>``): the directory's keys must hash to the fingerprint that hospital IT
confirmed with the peer out of band (the peer prints it with ``site-node keys
fingerprint``). A pin changes only along a chain of signed key rotations from the pinned
key (:func:`concord_protocol.site_keys.follow_rotations`), which the agent follows on
each pass (:meth:`PeerStore.follow`); anything else is refused and reported.

Layout: ``<state_dir>/peers.json``::

    {"version": 1, "peers": {"<site-id>": {"signing_public_key", "exchange_public_key",
     "fingerprint", "pinned_at", "via", "history": [<earlier fingerprints>],
     "previous_signing_keys": [<earlier signing keys, for older audit cosignatures>]}}}

The file is written atomically with mode 0600; a damaged file is an error, never an empty
set of pins (which would only fail closed, but hide the damage).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.fields import format_utc, utcnow
from concord_protocol.private_files import write_private_file
from concord_protocol.site_keys import (
    KeyRotation,
    PinnedKeys,
    SignatureError,
    format_fingerprint,
    parse_fingerprint,
    rotation_path,
    site_key_fingerprint,
)
from site_node.crypto.sealing import SiteKeyPair
from site_node.errors import SiteError

__all__ = [
    "PEERS_FILE",
    "FollowResult",
    "Peer",
    "PeerError",
    "PeerStore",
    "RosterProblem",
    "check_roster",
    "own_keys",
]

PEERS_FILE = "peers.json"


class PeerError(SiteError):
    """A peer cannot be pinned or trusted as asked. ``code`` says why (``peers.*``)."""

    code = "peers.invalid"


@dataclass(frozen=True)
class Peer:
    """A pinned peer: its keys, and how and when the pin was made."""

    keys: PinnedKeys
    pinned_at: str
    via: str  # "pin" (confirmed out of band) or "rotation" (followed from a pin)
    history: tuple[str, ...] = ()
    #: Signing keys this peer used before (each once pinned or reached by a checked
    #: rotation): its older audit cosignatures verify with them.
    previous_signing_keys: tuple[str, ...] = ()

    @property
    def site_id(self) -> str:
        """The peer's site id."""
        return self.keys.site_id

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the pinned keys."""
        return self.keys.fingerprint


def own_keys(site_id: str, keys: SiteKeyPair) -> PinnedKeys:
    """This site's own public keys in pinned form."""
    return PinnedKeys(site_id, keys.signing_public_b64, keys.exchange_public_b64)


@dataclass
class FollowResult:
    """What one pass of following peers' rotations did."""

    rotated: dict[str, str] = field(default_factory=dict)  # site id -> new fingerprint
    refused: dict[str, str] = field(default_factory=dict)  # site id -> error code

    @property
    def ok(self) -> bool:
        """True when no peer's published keys were refused."""
        return not self.refused

    def summary(self) -> dict[str, int]:
        """Counts for the log."""
        return {"rotated": len(self.rotated), "refused": len(self.refused)}


class PeerStore:
    """The pinned peers of one site (``<state_dir>/peers.json``)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / PEERS_FILE

    # --- reading ------------------------------------------------------------------------

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            body = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise PeerError(f"{self.path} is not valid JSON", code="peers.corrupt") from None
        peers = body.get("peers") if isinstance(body, dict) else None
        if not isinstance(peers, dict):
            raise PeerError(f"{self.path} holds no peers table", code="peers.corrupt")
        return peers

    def _peer(self, site_id: str, row: Mapping[str, Any]) -> Peer:
        try:
            keys = PinnedKeys(
                site_id, str(row["signing_public_key"]), str(row["exchange_public_key"])
            )
            if keys.fingerprint != row["fingerprint"]:
                raise PeerError(
                    f"{self.path}: the pin of {site_id} does not match its keys (file altered?)",
                    code="peers.corrupt",
                )
            return Peer(
                keys,
                str(row["pinned_at"]),
                str(row["via"]),
                tuple(row.get("history", ())),
                tuple(str(k) for k in row.get("previous_signing_keys", ())),
            )
        except (KeyError, SignatureError):
            raise PeerError(
                f"{self.path}: the pin of {site_id} is damaged", code="peers.corrupt"
            ) from None

    def all(self) -> dict[str, Peer]:
        """Every pinned peer by site id."""
        return {sid: self._peer(sid, row) for sid, row in sorted(self._read().items())}

    def get(self, site_id: str) -> Peer | None:
        """The pin of ``site_id``, or ``None``."""
        row = self._read().get(site_id)
        return None if row is None else self._peer(site_id, row)

    # --- writing ------------------------------------------------------------------------

    def _write(self, peers: Mapping[str, Mapping[str, Any]]) -> None:
        body = {"version": 1, "peers": dict(sorted(peers.items()))}
        write_private_file(self.path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())

    def _store(
        self,
        keys: PinnedKeys,
        *,
        via: str,
        history: Sequence[str],
        previous_signing_keys: Sequence[str] = (),
    ) -> Peer:
        peers = self._read()
        earlier = [k for k in dict.fromkeys(previous_signing_keys) if k != keys.signing_public_key]
        peers[keys.site_id] = {
            "signing_public_key": keys.signing_public_key,
            "exchange_public_key": keys.exchange_public_key,
            "fingerprint": keys.fingerprint,
            "pinned_at": format_utc(utcnow()),
            "via": via,
            "history": list(history),
            "previous_signing_keys": earlier,
        }
        self._write(peers)
        return self._peer(keys.site_id, peers[keys.site_id])

    def pin(self, site_id: str, fingerprint: str, directory: Mapping[str, Any]) -> Peer:
        """Pin ``site_id`` to the keys of its directory entry, provided they hash to the
        ``fingerprint`` hospital IT confirmed with the peer.

        Raises :class:`PeerError`: ``peers.fingerprint_mismatch`` when the directory's keys
        are not those (nothing is stored: the server, or the fingerprint, is wrong).
        Pinning again with the same keys is a no-op; with other keys it replaces the pin
        (an operator's decision after confirming the new fingerprint).
        """
        try:
            expected = parse_fingerprint(fingerprint)
            keys = PinnedKeys(
                site_id,
                str(directory["signing_public_key"]),
                str(directory["exchange_public_key"]),
            )
            actual = keys.fingerprint
        except SignatureError as exc:
            raise PeerError(exc.message, code=exc.code) from None
        except KeyError:
            raise PeerError(
                f"the directory entry of {site_id} has no public keys", code="peers.invalid"
            ) from None
        if actual != expected:
            raise PeerError(
                f"the consortium's directory gives {site_id} keys with fingerprint "
                f"{format_fingerprint(actual)}, not the {format_fingerprint(expected)} you "
                "confirmed: nothing was pinned",
                code="peers.fingerprint_mismatch",
                hint=f"Confirm the fingerprint with {site_id}'s IT again (`site-node keys "
                "fingerprint` there). If it is right, the directory is not: report it to "
                "the consortium operator.",
            )
        current = self.get(site_id)
        if current is not None and current.fingerprint == actual:
            return current
        history = [*current.history, current.fingerprint] if current is not None else []
        earlier = (
            [*current.previous_signing_keys, current.keys.signing_public_key]
            if current is not None
            else []
        )
        return self._store(keys, via="pin", history=history, previous_signing_keys=earlier)

    def unpin(self, site_id: str) -> bool:
        """Forget a peer; True if it was pinned."""
        peers = self._read()
        if peers.pop(site_id, None) is None:
            return False
        self._write(peers)
        return True

    def follow(self, directory: Iterable[Mapping[str, Any]], api: ConsortiumClient) -> FollowResult:
        """Follow the signed key rotations of every pinned peer whose directory keys moved.

        A peer whose published keys differ from its pin is looked up in its key history
        (``GET /api/v1/sites/{id}/keys/history``); the pin moves only if the rotations chain
        from it to the published keys, each signed by the key it replaces and by the new
        one. Otherwise the pin stays, and the peer is reported (``peers.key_mismatch``):
        studies with it cannot get keys here until hospital IT pins it again.
        """
        result = FollowResult()
        published = {str(s.get("id")): s for s in directory}
        for site_id, peer in self.all().items():
            entry = published.get(site_id)
            if entry is None:
                continue
            try:
                fingerprint = site_key_fingerprint(
                    str(entry["signing_public_key"]), str(entry["exchange_public_key"])
                )
            except (KeyError, SignatureError):
                result.refused[site_id] = "peers.key_mismatch"
                continue
            if fingerprint == peer.fingerprint:
                continue
            try:
                body = api.request("GET", f"/api/v1/sites/{site_id}/keys/history")
                rotations = [KeyRotation.model_validate(r["rotation"]) for r in body]
                path = rotation_path(peer.keys, rotations)
                new = path[-1]
            except ApiError:
                raise
            except (SignatureError, KeyError, TypeError, ValueError):
                result.refused[site_id] = "peers.key_mismatch"
                continue
            if new.fingerprint != fingerprint:
                result.refused[site_id] = "peers.key_mismatch"
                continue
            self._store(
                new,
                via="rotation",
                history=[*peer.history, peer.fingerprint],
                previous_signing_keys=[
                    *peer.previous_signing_keys,
                    *(k.signing_public_key for k in path[:-1]),
                ],
            )
            result.rotated[site_id] = fingerprint
        return result


@dataclass(frozen=True)
class RosterProblem:
    """Why one roster entry cannot be trusted here."""

    site_id: str
    code: str
    message: str


def check_roster(
    roster: Sequence[Any], *, site_id: str, own: PinnedKeys, peers: Mapping[str, Peer]
) -> list[RosterProblem]:
    """The problems of a contract's roster against this site's own keys and its pins.

    Every member must be pinned here with exactly the fingerprint the roster names (this
    site: its own keys), and this site must be in it. An empty list means every member is
    one the site's IT confirmed.
    """
    problems: list[RosterProblem] = []
    ids = {m.site_id for m in roster}
    if site_id not in ids:
        problems.append(
            RosterProblem(site_id, "roster.not_member", "this site is not in the study's roster")
        )
    for member in roster:
        if member.site_id == site_id:
            if member.key_fingerprint != own.fingerprint:
                problems.append(
                    RosterProblem(
                        site_id,
                        "roster.own_key_mismatch",
                        "the roster names other keys for this site than the ones it holds",
                    )
                )
            continue
        peer = peers.get(member.site_id)
        if peer is None:
            problems.append(
                RosterProblem(
                    member.site_id,
                    "roster.unpinned",
                    f"{member.site_id} is not pinned here (site-node peers pin "
                    f"{member.site_id} <fingerprint>)",
                )
            )
        elif peer.fingerprint != member.key_fingerprint:
            problems.append(
                RosterProblem(
                    member.site_id,
                    "roster.key_mismatch",
                    f"the roster names keys {format_fingerprint(member.key_fingerprint)[:19]}… "
                    f"for {member.site_id}, but the pinned ones are "
                    f"{format_fingerprint(peer.fingerprint)[:19]}…",
                )
            )
    return problems
