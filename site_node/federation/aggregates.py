"""Opening an aggregate at the site: believe it only once it checks out, use it once.

An aggregate comes from the server, which may lie. Before the site trains on one (the
previous round's, in a train message), evaluates one or releases one, it:

1. parses the update and checks its header: this study, contract, round, parameter count,
   scheme and integrity tag slots;
2. checks the manifest of signed contributions it claims to sum
   (:meth:`~concord_protocol.contributions.AggregateManifest.verify`): each signature with
   the key *this site* pinned for that roster member (:func:`roster_keys`), each weight
   within the member's roster entry, at least ``min_sites`` of them, the divisor equal to
   the signed weights' sum;
3. checks that its own timely contribution to that round is listed, with the digest it
   sent (:class:`RoundLedger`): a server cannot leave an honest site out to steer the sum;
4. decrypts it against the listed sites, which checks the secret integrity tags
   (:mod:`site_node.crypto.tags`): nothing was added, dropped or swapped.

Any failure raises :class:`AggregateRefusedError` with an ``aggregate.*`` code; the
ClientApp's error reply carries it to the ServerApp, which records it, and the round's
audit entry shows it. :class:`RoundLedger` also remembers what this site answered: one
evaluation per round (the same aggregate asked again gets the same answer; another one is
refused, ``evaluation.already_answered``), and the one aggregate released.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from concord_protocol.contract import StudyContract
from concord_protocol.contributions import AggregateManifest, ManifestError
from concord_protocol.errors import CryptoError
from concord_protocol.private_files import write_private_file
from concord_protocol.wire.format import EncodedUpdate, RoundInfo
from site_node.crypto.codecs import ListedSum, UpdateCodec
from site_node.crypto.tags import AggregateIntegrityError
from site_node.errors import MessageRefusedError
from site_node.peers import PeerStore

__all__ = [
    "AggregateRefusedError",
    "EvaluationSlot",
    "OpenedAggregate",
    "RoundLedger",
    "open_aggregate",
    "roster_keys",
]


class AggregateRefusedError(MessageRefusedError):
    """The site refuses an aggregate (``aggregate.*``) or a second evaluation."""

    code = "aggregate.manifest_invalid"


def roster_keys(
    contract: StudyContract, *, site_id: str, own_signing_key: str, peers: PeerStore
) -> dict[str, str]:
    """Signing keys (API form) of the roster members whose keys this site holds as the
    roster names them: its own, and each peer it pinned with the roster's fingerprint."""
    keys: dict[str, str] = {}
    for member in contract.roster:
        if member.site_id == site_id:
            keys[site_id] = own_signing_key
            continue
        peer = peers.get(member.site_id)
        if peer is not None and peer.fingerprint == member.key_fingerprint:
            keys[member.site_id] = peer.keys.signing_public_key
    return keys


@dataclass(frozen=True)
class OpenedAggregate:
    """A verified, decrypted aggregate: the averaged parameters and what it sums."""

    round_number: int
    digest: str
    manifest: AggregateManifest
    params: npt.NDArray[np.float64]


def open_aggregate(
    blobs: Sequence[bytes],
    *,
    manifest_json: str,
    total_weight: float,
    round_number: int,
    contract: StudyContract,
    contract_hash: str,
    study_id: str,
    site_id: str,
    num_params: int,
    codec: UpdateCodec,
    keys: Mapping[str, str],
    ledger: RoundLedger,
) -> OpenedAggregate:
    """Check the aggregate of ``round_number`` as the module docs say and decrypt it.

    Raises :class:`AggregateRefusedError` (``aggregate.*``, ``update.*``).
    """
    try:
        update = EncodedUpdate.from_bytes_list(blobs)
    except CryptoError as exc:
        raise AggregateRefusedError(exc.message, code="update.global_mismatch") from None
    expected = RoundInfo(study_id, contract_hash, round_number, num_params, codec.tag_slots)
    if update.header.mismatches(expected) or update.header.scheme != codec.scheme:
        raise AggregateRefusedError(
            f"the aggregate is not round {round_number} of this study in this site's format",
            code="update.global_mismatch",
        )
    if not manifest_json:
        raise AggregateRefusedError(
            "the aggregate came without its manifest", code="aggregate.manifest_missing"
        )
    try:
        manifest = AggregateManifest.from_json(manifest_json)
        manifest.verify(
            study_id=study_id,
            contract_hash=contract_hash,
            round_number=round_number,
            keys=keys,
            min_sites=max(3, contract.federation.min_sites),
            total_weight=total_weight,
        )
    except ManifestError as exc:
        raise AggregateRefusedError(exc.message, code=exc.code) from None
    for signed in manifest.contributions:
        c = signed.contribution
        member = contract.member(c.site_id)
        if member is None:
            raise AggregateRefusedError(
                f"the aggregate lists {c.site_id}, not in the roster", code="aggregate.unknown_site"
            )
        if c.weight > member.max_examples:
            raise AggregateRefusedError(
                f"{c.site_id}'s listed weight {c.weight} exceeds its roster entry "
                f"{member.max_examples}",
                code="aggregate.weight_exceeds_roster",
            )
    mine = ledger.contribution(round_number)
    listed = manifest.contribution_of(site_id)
    if (
        mine is not None
        and mine["timely"]
        and (listed is None or listed.update_digest != mine["digest"])
    ):
        raise AggregateRefusedError(
            f"the aggregate of round {round_number} leaves out this site's timely contribution",
            code="aggregate.own_contribution_omitted",
        )
    if ledger.integrity_failed(round_number):
        raise AggregateRefusedError(
            f"an earlier aggregate of round {round_number} failed its integrity tags; this "
            "site opens no other aggregate of that round",
            code="aggregate.round_locked",
        )
    try:
        params = codec.decrypt_aggregate(
            update.chunks,
            num_params=num_params,
            total_weight=float(manifest.total_weight),
            listed=ListedSum(expected, manifest.sites),
        )
    except AggregateIntegrityError as exc:
        # The tags are one-time: a server that may try again learns a bit per refusal
        # about the round's secret tag coefficients. One failure locks the round.
        ledger.record_integrity_failure(round_number, update.digest)
        raise AggregateRefusedError(exc.message, code=exc.code) from None
    except CryptoError as exc:
        code = exc.code if exc.code.startswith("aggregate.") else "update.global_mismatch"
        raise AggregateRefusedError(exc.message, code=code) from None
    return OpenedAggregate(round_number, update.digest, manifest, params)


@dataclass
class EvaluationSlot:
    """One evaluation in progress (see :meth:`RoundLedger.evaluation`)."""

    answered: dict[str, Any] | None
    metrics: dict[str, Any] | None = None

    def answer(self, metrics: dict[str, Any]) -> None:
        """Record the metrics this site answers (kept when the ``with`` block ends)."""
        self.metrics = dict(metrics)


class RoundLedger:
    """What this site sent and answered in one study: its contributions (round -> digest,
    and whether it was sent in good time), its evaluations (round -> aggregate digest and
    metrics) and the aggregate it released. One JSON file per study, mode 0600, updated
    under a lock (train and evaluate run in separate processes)."""

    def __init__(self, state_dir: Path, study_id: str, contract_hash: str) -> None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in study_id)
        self.path = state_dir / "federation" / "rounds" / f"{safe}-{contract_hash[:16]}.json"

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"contributions": {}, "evaluations": {}, "released": None}
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except ValueError:
            raise AggregateRefusedError(
                f"{self.path} is damaged", code="aggregate.manifest_invalid"
            ) from None
        return data

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._read()
            yield data
            write_private_file(self.path, json.dumps(data, sort_keys=True).encode())
        finally:
            os.close(fd)

    def contribution(self, round_number: int) -> dict[str, Any] | None:
        """This site's contribution to ``round_number`` (``digest``, ``timely``), if any."""
        found: dict[str, Any] | None = self._read()["contributions"].get(str(round_number))
        return found

    def record_contribution(self, round_number: int, digest: str, *, timely: bool) -> None:
        """Note the update this site sent for ``round_number`` (the newest one counts)."""
        with self._locked() as data:
            data["contributions"][str(round_number)] = {"digest": digest, "timely": timely}

    @contextmanager
    def evaluation(self, round_number: int, aggregate_digest: str) -> Iterator[EvaluationSlot]:
        """Hold the ledger for one evaluation of ``round_number``'s aggregate.

        The slot's ``answered`` holds the metrics already answered for this very aggregate
        (answer them again: no new information), or ``None``: evaluate, then call
        :meth:`EvaluationSlot.answer`. Another aggregate of an answered round is refused
        (``evaluation.already_answered``): one answer per verified round.
        """
        with self._locked() as data:
            done = data["evaluations"].get(str(round_number))
            if done is not None and done["aggregate"] != aggregate_digest:
                raise AggregateRefusedError(
                    f"round {round_number} was evaluated already, on another aggregate",
                    code="evaluation.already_answered",
                )
            slot = EvaluationSlot(done["metrics"] if done is not None else None)
            yield slot
            if slot.metrics is not None and done is None:
                data["evaluations"][str(round_number)] = {
                    "aggregate": aggregate_digest,
                    "metrics": slot.metrics,
                }

    def integrity_failed(self, round_number: int) -> bool:
        """Whether an aggregate of ``round_number`` failed its integrity tags here."""
        return str(round_number) in self._read().get("integrity_failures", {})

    def record_integrity_failure(self, round_number: int, digest: str) -> None:
        """Lock ``round_number``: an aggregate of it (``digest``) failed its tags."""
        with self._locked() as data:
            data.setdefault("integrity_failures", {})[str(round_number)] = digest

    def released(self) -> str | None:
        """The digest of the aggregate this site released, if any."""
        value = self._read().get("released")
        return str(value) if value else None

    def record_release(self, digest: str) -> None:
        """Note the aggregate released (one per study; :func:`site_node.release` checks)."""
        with self._locked() as data:
            data["released"] = digest
