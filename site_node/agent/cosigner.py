"""The site's cosigner: cosign a tree head only if it extends the last head it cosigned.

Each site node keeps the last head it cosigned in a local JSON file. For a new head
:class:`Witness` checks, in order: the server's signature (with the server key the site
was given); that the tree did not shrink; that a head of the same size has the same root;
that the consistency proof from its last head verifies (RFC 9162). Only then does it store
the new head (atomic write, fsync) and return a
:class:`~concord_protocol.audit.cosignatures.Cosignature`. State is re-read from the file on
every call, so the rules hold across restarts and between processes (a file lock
serialises them). The first head a witness ever sees is trusted on first use; seed the
state file with a known head to avoid that.

The agent's pass that fetches heads and posts cosignatures is
:mod:`site_node.agent.witness`.
"""

from __future__ import annotations

import base64
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from concord_protocol.audit.cosignatures import DEFAULT_LOG_ID, Cosignature, cosignature_message
from concord_protocol.audit.heads import SignedTreeHead, key_id, verify_tree_head
from concord_protocol.audit.merkle import verify_consistency
from concord_protocol.errors import AuditVerificationError, InvalidProofError
from concord_protocol.fields import utcnow
from site_node.errors import SiteError

__all__ = ["STATE_FORMAT", "Witness", "WitnessRefusedError"]

STATE_FORMAT = "concord.audit.witness_state.v1"


class WitnessRefusedError(SiteError):
    """The witness refused to cosign; ``code`` says why (``audit.*``)."""

    code = "audit.tree_inconsistent"


class _WitnessState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    site_id: str
    server_key_id: str
    head: SignedTreeHead


class Witness:
    """A site's witness: remembers the last cosigned head in ``state_file``."""

    def __init__(
        self,
        state_file: Path,
        site_id: str,
        signing_key: Ed25519PrivateKey,
        server_public_key: Ed25519PublicKey,
        log_id: str = DEFAULT_LOG_ID,
    ) -> None:
        self.state_file = Path(state_file)
        self.site_id = site_id
        self.log_id = log_id
        self._signing_key = signing_key
        self._server_key = server_public_key
        self._server_key_id = key_id(server_public_key)
        self._lock = threading.Lock()
        self._load()  # fail early on a damaged or foreign state file

    @property
    def last_head(self) -> SignedTreeHead | None:
        """The last head this site cosigned (read from the state file)."""
        return self._load()

    def _load(self) -> SignedTreeHead | None:
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = _WitnessState.model_validate_json(raw)
        except ValidationError as exc:
            raise WitnessRefusedError(
                f"The witness state file {self.state_file} is damaged; restore it from backup "
                "(deleting it would let this site cosign a rewritten log).",
                code="audit.witness_state_invalid",
            ) from exc
        if state.format != STATE_FORMAT or state.site_id != self.site_id:
            raise WitnessRefusedError(
                f"The witness state file {self.state_file} belongs to another site or format.",
                code="audit.witness_state_invalid",
            )
        if state.server_key_id != self._server_key_id:
            raise WitnessRefusedError(
                "The witness state was recorded for a different server key.",
                code="audit.witness_state_invalid",
            )
        return state.head

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_file.with_name(self.state_file.name + ".lock")
        with self._lock, open(lock_path, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _store(self, head: SignedTreeHead) -> None:
        state = _WitnessState(
            format=STATE_FORMAT,
            site_id=self.site_id,
            server_key_id=self._server_key_id,
            head=head,
        )
        data = state.model_dump_json(indent=2).encode("utf-8")
        tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_file)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.state_file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def check(self, new_head: SignedTreeHead, consistency_proof: Sequence[bytes]) -> None:
        """Raise :class:`WitnessRefusedError` unless ``new_head`` may be cosigned now."""
        self._check(self._load(), new_head, consistency_proof)

    def _check(
        self,
        last: SignedTreeHead | None,
        new_head: SignedTreeHead,
        proof: Sequence[bytes],
    ) -> None:
        try:
            verify_tree_head(new_head, self._server_key)
        except AuditVerificationError as exc:
            raise WitnessRefusedError(exc.message, code=exc.code) from exc
        if last is None:
            return
        if new_head.tree_size < last.tree_size:
            raise WitnessRefusedError(
                f"The log shrank from {last.tree_size} to {new_head.tree_size} leaves.",
                code="audit.tree_shrunk",
            )
        if new_head.timestamp < last.timestamp:
            raise WitnessRefusedError(
                "The head is older than the last head this site cosigned.",
                code="audit.head_stale",
            )
        try:
            verify_consistency(last.tree_size, new_head.tree_size, last.root, new_head.root, proof)
        except InvalidProofError as exc:
            raise WitnessRefusedError(
                f"The head of size {new_head.tree_size} does not extend the cosigned head of "
                f"size {last.tree_size}: {exc.reason}.",
                code="audit.tree_inconsistent",
            ) from exc

    def cosign(
        self,
        new_head: SignedTreeHead,
        consistency_proof: Sequence[bytes],
        *,
        now: datetime | None = None,
    ) -> Cosignature:
        """Cosign ``new_head`` if it is signed by the server and extends the last head.

        ``consistency_proof`` goes from the last cosigned head's size to ``new_head``'s
        (empty for the first head, or for the same size). The new head is persisted
        before the cosignature is returned.
        """
        with self._exclusive():
            last = self._load()
            self._check(last, new_head, consistency_proof)
            self._store(new_head)
        when = now or utcnow()
        message = cosignature_message(
            log_id=self.log_id,
            key_id=new_head.key_id,
            site_id=self.site_id,
            tree_size=new_head.tree_size,
            root_hash=new_head.root_hash,
            head_timestamp=new_head.timestamp,
            timestamp=when,
        )
        signature = base64.b64encode(self._signing_key.sign(message)).decode("ascii")
        return Cosignature(
            site_id=self.site_id,
            tree_size=new_head.tree_size,
            root_hash=new_head.root_hash,
            timestamp=when,
            signature=signature,
            log_id=self.log_id,
            key_id=new_head.key_id,
            head_timestamp=new_head.timestamp,
        )
