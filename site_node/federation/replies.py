"""The site's last train reply of each study, to answer a resumed round without training again.

When the consortium server and its SuperLink restart mid-study, the run goes on from the
round after the last *aggregated* one. This site may already have trained that round (its
reply was lost with the old run). Training again would spend privacy budget twice for one
round, and a study planned for R rounds would then be refused by the accountant in its last
round. So a repeated request (same study, contract, round and the same incoming global
model, by digest) is answered with the reply sent before: the same ciphertexts and the same
metadata. Sending an already released output again costs no privacy (post-processing), and
the consortium's ledger charges the same cumulative epsilon once.

A request for the same round with a *different* global model is a new question: it misses
the cache and trains (and spends) as usual. Only the newest reply per study is kept, in
``<state_dir>/replies`` (mode 0600; it holds ciphertexts and counts, nothing in clear).

:meth:`ReplyCache.exclusive` serialises train requests of one study at the site: the old
run's ClientApp may still be training when the resumed run asks the same round again; the
second waits for the first and then finds its reply.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CachedReply", "ReplyCache", "global_digest"]

_MAGIC = b"CONCORD-REPLY-1\n"


def global_digest(blobs: Iterable[bytes] | None, *, round_number: int, total_weight: float) -> str:
    """Digest of the global model a train request carries (``"none"`` in round 1)."""
    if blobs is None:
        return "none"
    digest = hashlib.sha256(f"{round_number}:{total_weight!r}".encode())
    for blob in blobs:
        digest.update(struct.pack(">Q", len(blob)))
        digest.update(blob)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedReply:
    """One train reply as sent: the update's wire blobs and its plain metrics."""

    round_number: int
    global_digest: str
    blobs: tuple[bytes, ...]
    metrics: dict[str, int | float]


class ReplyCache:
    """The newest train reply of one study (by study id and contract hash) at this site."""

    def __init__(self, state_dir: Path, study_id: str, contract_hash: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_id)
        self.path = state_dir / "replies" / f"{safe}-{contract_hash[:16]}.bin"
        self._study = study_id
        self._contract_hash = contract_hash

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the study's train lock at this site (an advisory ``flock``) for the block."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def get(self, round_number: int, digest: str) -> CachedReply | None:
        """The reply to the same request, or ``None`` (also for an unreadable file)."""
        try:
            reply = self._read()
        except (OSError, ValueError, KeyError, struct.error):
            return None
        if reply.round_number != round_number or reply.global_digest != digest:
            return None
        return reply

    def put(self, reply: CachedReply) -> None:
        """Keep ``reply`` (replacing the study's previous one) atomically."""
        header = json.dumps(
            {
                "study_id": self._study,
                "contract_hash": self._contract_hash,
                "round": reply.round_number,
                "global_digest": reply.global_digest,
                "metrics": reply.metrics,
                "blobs": len(reply.blobs),
            },
            sort_keys=True,
        ).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(_MAGIC)
            for part in (header, *reply.blobs):
                fh.write(struct.pack(">Q", len(part)))
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _read(self) -> CachedReply:
        data = self.path.read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError("not a reply file")
        parts: list[bytes] = []
        pos = len(_MAGIC)
        while pos < len(data):
            (size,) = struct.unpack_from(">Q", data, pos)
            pos += 8
            if pos + size > len(data):
                raise ValueError("truncated reply file")
            parts.append(data[pos : pos + size])
            pos += size
        if not parts:
            raise ValueError("empty reply file")
        header = json.loads(parts[0])
        if header["study_id"] != self._study or header["contract_hash"] != self._contract_hash:
            raise ValueError("reply file of another study")
        blobs = tuple(parts[1:])
        if len(blobs) != int(header["blobs"]):
            raise ValueError("reply file lost blobs")
        return CachedReply(
            round_number=int(header["round"]),
            global_digest=str(header["global_digest"]),
            blobs=blobs,
            metrics=dict(header["metrics"]),
        )
