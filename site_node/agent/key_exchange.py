"""Study key exchange: every site of a study's roster ends with the same CKKS secret key.

Who generates: the contract's ``key_generator``, a roster member named inside the hash
every steward approved (the server cannot choose it after the fact, nor slip in a site
that sorts first). Whose keys: only those pinned at this site (:mod:`site_node.peers`),
never the server's directory.

The generating site (:func:`exchange_keys`), once every roster member's signed approval
verified here (:attr:`ActiveStudy.fully_approved`, so a key goes only to sites that
approved this exact contract):

1. creates the study context (:func:`generate_study_context`) and saves it in its
   :class:`ApprovalStore` *before* uploading, so a crash between the two reuses the same
   key after a restart instead of generating a second one;
2. seals it to every other roster member's *pinned* X25519 key, signing as itself
   (:func:`seal_study_key`);
3. posts the public context (no secret key) and the sealed keys to
   ``POST /api/v1/studies/{id}/keys``. The first upload wins; a ``keys.exists`` answer
   means it was already relayed, which is then checked like a fresh relay.

Every other member polls ``GET /api/v1/studies/{id}/keys/mine`` until the key is there,
checks that the sender is the contract's key generator, opens the sealed key with its own
X25519 key and the generator's *pinned* Ed25519 key (:func:`open_study_key`: addressing,
signature, AEAD, public context, fingerprint), and saves it. The server only ever sees the
public context and sealed bytes, and a key it swapped in its directory is never used.

Idempotent across restarts: a site that holds the key does nothing. The generator checks
once that the relayed fingerprint is its own and then remembers it in
``<state_dir>/agent/relayed-keys.json``, so a steady-state pass makes no key requests
(each ``/keys/mine`` call is an audit entry on the server). Studies without encryption
need no key.
Fingerprints are public (sites compare them); the key itself is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.sealed_key import SealedKey, ed25519_public_from_b64, x25519_public_from_b64
from site_node.agent.sync import ActiveStudy, AgentError, is_transient
from site_node.crypto.ckks import generate_study_context, public_context
from site_node.crypto.errors import CryptoError
from site_node.crypto.sealing import (
    SiteKeyPair,
    open_study_key,
    seal_study_key,
    study_key_fingerprint,
)
from site_node.federation.approvals import ApprovalError, ApprovalStore
from site_node.peers import Peer

__all__ = ["RELAYED_FILE", "KeyResult", "exchange_keys"]

#: Studies whose key this site generated and saw relayed: study id -> key fingerprint.
RELAYED_FILE = Path("agent") / "relayed-keys.json"


@dataclass
class KeyResult:
    """What one key-exchange pass did, by study id (failures carry the error code)."""

    generated: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no study failed (waiting for the generator is not a failure)."""
        return not self.failed

    def summary(self) -> dict[str, int]:
        """Counts for the log."""
        return {
            "generated": len(self.generated),
            "received": len(self.received),
            "unchanged": len(self.unchanged),
            "waiting": len(self.waiting),
            "failed": len(self.failed),
        }


class _KeyExchange:
    """One pass for one site; caches the site directory for the pass."""

    def __init__(
        self,
        api: ConsortiumClient,
        site_id: str,
        site_keys: SiteKeyPair,
        store: ApprovalStore,
        peers: Mapping[str, Peer],
    ) -> None:
        self.api = api
        self.site_id = site_id
        self.site_keys = site_keys
        self.store = store
        self.peers = peers
        self.result = KeyResult()
        self._sites: dict[str, dict[str, Any]] | None = None
        self._relayed_path = store.root.parent / RELAYED_FILE

    def relayed(self) -> dict[str, str]:
        """Study id -> fingerprint of the keys this site generated and saw relayed."""
        try:
            data = json.loads(self._relayed_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def remember_relayed(self, study_id: str, fingerprint: str) -> None:
        """Record that the relay carries this site's key (atomic write)."""
        data = self.relayed() | {study_id: fingerprint}
        self._relayed_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._relayed_path.with_name(f".{self._relayed_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True, indent=2))
        os.replace(tmp, self._relayed_path)

    def sites(self) -> dict[str, dict[str, Any]]:
        """Enrolled sites by id (public keys only), fetched once per pass."""
        if self._sites is None:
            self._sites = {str(s["id"]): s for s in self.api.list_sites()}
        return self._sites

    def enrolled(self, site_id: str) -> dict[str, Any]:
        """The enrolment record of an active site, or :class:`AgentError`."""
        record = self.sites().get(site_id)
        if record is None or record.get("status") != "active":
            raise AgentError(
                f"site {site_id} is not an active enrolled site", code="agent.site_not_active"
            )
        return record

    def pinned(self, site_id: str) -> Peer:
        """The pin of a roster member, or :class:`AgentError` (``peers.not_pinned``)."""
        peer = self.peers.get(site_id)
        if peer is None:
            raise AgentError(
                f"{site_id} is not pinned at this site: its keys are not trusted",
                code="peers.not_pinned",
                hint=f"Confirm {site_id}'s fingerprint with its IT, then "
                f"`site-node peers pin {site_id} <fingerprint>`.",
            )
        return peer

    def mine(self, study_id: str) -> dict[str, Any] | None:
        """The relayed key for this site, or ``None`` when nothing was relayed yet."""
        try:
            body: dict[str, Any] = self.api.request("GET", f"/api/v1/studies/{study_id}/keys/mine")
        except ApiError as exc:
            if exc.status == 404 and exc.code == "keys.not_found":
                return None
            raise
        return body

    def run(self, study: ActiveStudy) -> None:
        """Generate or receive the key of one study."""
        if not study.encrypted or self.site_id not in study.roster:
            return
        if study.key_generator == self.site_id:
            self.generate(study)
        else:
            self.receive(study)

    # --- the generating site ------------------------------------------------------

    def generate(self, study: ActiveStudy, *, retried: bool = False) -> None:
        """Create, seal and upload the study key (or check the relayed one is ours)."""
        local = self.store.study_key(study.study_id)
        known = self.relayed().get(study.study_id)
        if local is not None and local.sender_id == self.site_id and known == local.key_fingerprint:
            self.result.unchanged.append(study.study_id)
            self.result.fingerprints[study.study_id] = local.key_fingerprint
            return
        relayed = self.mine(study.study_id)
        if relayed is not None:
            if relayed.get("sender_site_id") != self.site_id:
                self.receive(study, relayed=relayed)
                return
            self.check_own_relay(study, relayed)
            if retried:
                self.result.generated.append(study.study_id)
            else:
                self.result.unchanged.append(study.study_id)
            return
        if not study.fully_approved:
            self.result.waiting.append(study.study_id)
            return
        me = self.enrolled(self.site_id)
        if me.get("signing_public_key") != self.site_keys.signing_public_b64:
            raise AgentError(
                "this site's signing key is not the one enrolled with the consortium",
                code="agent.keys_not_enrolled",
                hint="Check CONCORD_SITE_STATE_DIR/keys, or re-enrol the site's public keys.",
            )
        local = self.store.study_key(study.study_id)
        if local is None or local.sender_id != self.site_id:
            local = self.store.save_study_key(
                study.study_id, generate_study_context(), sender_id=self.site_id
            )
        sealed = []
        for recipient in study.roster:
            if recipient == self.site_id:
                continue
            peer = self.pinned(recipient)
            sealed.append(
                seal_study_key(
                    local.secret_context,
                    sender_id=self.site_id,
                    sender_signing_key=self.site_keys.signing_key,
                    recipient_id=recipient,
                    recipient_exchange_public=x25519_public_from_b64(peer.keys.exchange_public_key),
                    study_id=study.study_id,
                    contract_hash=study.contract_hash,
                ).model_dump(mode="json")
            )
        body = {
            "public_context": base64.b64encode(public_context(local.secret_context)).decode(),
            "key_fingerprint": local.key_fingerprint,
            "sealed_keys": sealed,
        }
        try:
            self.api.request("POST", f"/api/v1/studies/{study.study_id}/keys", json=body)
        except ApiError as exc:
            if exc.status == 409 and exc.code == "keys.exists" and not retried:
                self.generate(study, retried=True)
                return
            raise
        self.remember_relayed(study.study_id, local.key_fingerprint)
        self.result.generated.append(study.study_id)
        self.result.fingerprints[study.study_id] = local.key_fingerprint

    def check_own_relay(self, study: ActiveStudy, relayed: dict[str, Any]) -> None:
        """The relay names this site as sender: it must carry the key this site holds."""
        local = self.store.study_key(study.study_id)
        if local is None:
            raise AgentError(
                f"study {study.study_id}: this site relayed the study key but no longer holds "
                "it (state volume lost?)",
                code="agent.study_key_lost",
                hint="Restore the state volume from backup; the study cannot be decrypted here.",
            )
        if local.key_fingerprint != relayed.get("key_fingerprint"):
            raise AgentError(
                f"study {study.study_id}: the relayed key fingerprint is not this site's key",
                code="agent.fingerprint_mismatch",
            )
        self.remember_relayed(study.study_id, local.key_fingerprint)
        self.result.fingerprints[study.study_id] = local.key_fingerprint

    # --- every other site ---------------------------------------------------------

    def receive(self, study: ActiveStudy, *, relayed: dict[str, Any] | None = None) -> None:
        """Fetch, verify, open and save the key sealed to this site."""
        local = self.store.study_key(study.study_id)
        if local is not None and local.sender_id != self.site_id and relayed is None:
            self.result.unchanged.append(study.study_id)
            self.result.fingerprints[study.study_id] = local.key_fingerprint
            return
        if relayed is None:
            relayed = self.mine(study.study_id)
        if relayed is None:
            self.result.waiting.append(study.study_id)
            return
        sender = str(relayed.get("sender_site_id"))
        if sender != study.key_generator or sender == self.site_id:
            raise AgentError(
                f"study {study.study_id}: the key was sent by {sender}, not by the contract's "
                f"key generator {study.key_generator}",
                code="agent.key_sender_not_approved",
            )
        pinned_key = self.pinned(sender).keys.signing_public_key
        if relayed.get("sender_signing_public_key") != pinned_key:
            raise AgentError(
                f"study {study.study_id}: the relay names another signing key for {sender} "
                "than the one pinned here",
                code="agent.sender_key_mismatch",
            )
        try:
            sealed = SealedKey.model_validate(relayed.get("sealed_key"))
            public = base64.b64decode(str(relayed.get("public_context")), validate=True)
        except (ValidationError, binascii.Error, ValueError):
            raise AgentError(
                f"study {study.study_id}: the relayed key is malformed",
                code="agent.relay_malformed",
            ) from None
        secret = open_study_key(
            sealed,
            recipient_exchange_private=self.site_keys.exchange_key,
            sender_signing_public=ed25519_public_from_b64(pinned_key),
            expected_study_id=study.study_id,
            expected_contract_hash=study.contract_hash,
            expected_recipient_id=self.site_id,
            expected_public_context_sha256=hashlib.sha256(public).hexdigest(),
        )
        fingerprint = study_key_fingerprint(secret)
        if fingerprint != relayed.get("key_fingerprint"):
            raise AgentError(
                f"study {study.study_id}: the opened key does not match the relayed fingerprint",
                code="agent.fingerprint_mismatch",
            )
        if local is not None and local.key_fingerprint == fingerprint:
            self.result.unchanged.append(study.study_id)
        else:
            self.store.save_study_key(study.study_id, secret, sender_id=sender)
            self.result.received.append(study.study_id)
        self.result.fingerprints[study.study_id] = fingerprint


def exchange_keys(
    api: ConsortiumClient,
    *,
    site_id: str,
    site_keys: SiteKeyPair,
    store: ApprovalStore,
    studies: Sequence[ActiveStudy],
    peers: Mapping[str, Peer],
) -> KeyResult:
    """One key-exchange pass over ``studies`` (from :func:`sync_approvals`).

    A study that fails (a refused sealed key, a site not enrolled) is recorded in
    :attr:`KeyResult.failed` and the others go on; transient API errors propagate so that
    the caller retries the whole (idempotent) pass.
    """
    exchange = _KeyExchange(api, site_id, site_keys, store, peers)
    for study in studies:
        try:
            exchange.run(study)
        except (AgentError, ApprovalError, CryptoError) as exc:
            exchange.result.failed[study.study_id] = exc.code
        except ApiError as exc:
            if is_transient(exc):
                raise
            exchange.result.failed[study.study_id] = exc.code
    return exchange.result
