"""The site's part of the release gate: decrypt the final aggregate, sign off its hash.

::

    from site_node.release import sign_off
    result = sign_off(api, study_id, site_id="hospital-a", keys=keys, store=store, upload=True)

Steps (see :mod:`consortium_server.release` for the shared definitions):

1. fetch the final aggregate (``GET /api/v1/studies/{id}/release/aggregate``);
2. check it: this site approved its contract hash for this study, the wire format is
   intact (every chunk digest, the update digest) and names this study and contract, an
   encrypted contract came back encrypted (the server cannot downgrade to ``plain``), it
   is the *final* round's aggregate (``release.not_final`` otherwise: the release step is
   no oracle for other ciphertexts), and it checks out as every aggregate a site uses
   does (:func:`site_node.federation.aggregates.open_aggregate`: the signed contributions
   it lists, this site's own among them, and its integrity tags); a site releases one
   aggregate per study (another one is refused, ``release.not_final``);
3. decrypt it with the study key from the site's :class:`ApprovalStore` (the result is
   the same at every site: decryption rounds to a grid, docs/crypto.md);
4. hash the canonical model bytes (little-endian float64) and sign
   ``canonical_json({study_id, contract_hash, model_sha256, site_id})`` with the site's
   Ed25519 signing key; post the sign-off;
5. before any of that, check that the aggregate is the one on record: the server names the
   final round's ``round.completed`` audit entry (``audit_index``); the site fetches it
   with an inclusion proof against the latest tree head *it witnessed* (cosigned after
   checking consistency) and requires that entry to name this study, the final round and
   this aggregate's digest (``release.not_on_record``; ``release.not_witnessed`` while the
   entry is newer than the witnessed head: the agent witnesses first and retries);
6. with ``upload=True``, upload the model bytes too (one site is enough), with their
   parameter layout: the contract's catalogue network built for the input shape and class
   count the server names with the aggregate, provided the catalogue gives it exactly the
   decrypted model's parameter count (checked before it is built;
   ``release.layout_mismatch`` otherwise). The layout lets the server serve the model as a
   safetensors file; the bytes, and so the hash the sites signed, are the same with or
   without it. A reader checks the layout against the network again
   (:mod:`site_node.training.released`).

Nothing here logs parameter values.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from concord_protocol.audit.heads import SignedTreeHead
from concord_protocol.audit.merkle import leaf_hash, verify_inclusion
from concord_protocol.client import ConsortiumClient
from concord_protocol.contract import ModelSpec
from concord_protocol.errors import InvalidProofError
from concord_protocol.release import canonical_model_bytes, model_sha256, signoff_message
from concord_protocol.wire.format import CKKS_TAG_SLOTS, EncodedUpdate
from site_node.crypto.codecs import CkksCodec, PlainCodec, UpdateCodec
from site_node.crypto.errors import CryptoError
from site_node.crypto.sealing import SiteKeyPair
from site_node.errors import SiteError
from site_node.federation.aggregates import (
    AggregateRefusedError,
    RoundLedger,
    open_aggregate,
    roster_keys,
)
from site_node.federation.approvals import ApprovalStore
from site_node.peers import PeerStore

__all__ = [
    "ReleaseError",
    "SignOffResult",
    "check_on_record",
    "decrypt_final_model",
    "sign_off",
    "upload_layout",
]


class ReleaseError(SiteError):
    """The site refuses to sign off (``code`` says why: ``release.*``)."""

    code = "release.refused"


@dataclass(frozen=True)
class SignOffResult:
    """What the site signed off (and whether it uploaded the model)."""

    study_id: str
    site_id: str
    contract_hash: str
    model_sha256: str
    num_params: int
    uploaded: bool


def _b64decode(value: Any) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseError(
            "the aggregate holds a blob that is not base64", code="release.malformed"
        ) from None


def decrypt_final_model(
    aggregate: dict[str, Any],
    study_id: str,
    *,
    store: ApprovalStore,
    site_id: str,
    keys: SiteKeyPair,
) -> tuple[str, bytes]:
    """Check and decrypt the server's final aggregate; returns (contract hash, model bytes).

    Raises :class:`ReleaseError` when this site did not approve the contract, the aggregate
    is not for this study, not the final round's, does not check out, or cannot be
    decrypted.
    """
    contract_hash = str(aggregate.get("contract_hash", ""))
    approved = store.get(contract_hash)
    if approved is None or approved.study_id != study_id:
        raise ReleaseError(
            f"this site did not approve contract {contract_hash[:16]} for study {study_id}",
            code="release.not_approved",
        )
    try:
        update = EncodedUpdate.from_bytes_list([_b64decode(b) for b in aggregate["blobs"]])
    except CryptoError as exc:
        raise ReleaseError(f"the aggregate is malformed: {exc}", code="release.malformed") from None
    except (KeyError, TypeError):
        raise ReleaseError("the aggregate has no blobs", code="release.malformed") from None
    header = update.header
    mismatches = [
        name
        for name, ok in (
            ("study id", header.study_id == study_id),
            ("contract hash", header.contract_hash == contract_hash),
            ("digest", update.digest == aggregate.get("digest")),
            ("parameter count", header.num_params == aggregate.get("num_params")),
            ("round", header.round_number == aggregate.get("round_number")),
        )
        if not ok
    ]
    if mismatches:
        raise ReleaseError(
            f"the aggregate does not match: {', '.join(mismatches)}", code="release.mismatch"
        )
    final = approved.contract.training.rounds
    if header.round_number != final:
        raise ReleaseError(
            f"the aggregate offered is round {header.round_number}'s; only the final round "
            f"({final}) is released",
            code="release.not_final",
        )
    ledger = RoundLedger(store.root.parent, study_id, contract_hash)
    released = ledger.released()
    if released is not None and released != update.digest:
        raise ReleaseError(
            "this site released another aggregate of this study already",
            code="release.not_final",
        )
    codec: UpdateCodec
    if approved.contract.encryption.enabled:
        scheme = approved.contract.encryption.scheme
        if header.scheme != scheme:
            raise ReleaseError(
                f"the contract requires {scheme} encryption but the aggregate is {header.scheme}",
                code="release.mismatch",
            )
        key = store.study_key(study_id)
        if key is None:
            raise ReleaseError(f"no study key for {study_id} at this site", code="release.no_key")
        codec = CkksCodec(key.secret_context, tag_slots=CKKS_TAG_SLOTS, scheme=scheme)
    else:
        codec = PlainCodec(chunk_size=header.chunk_size)
    try:
        opened = open_aggregate(
            update.to_bytes_list(),
            manifest_json=str(aggregate.get("manifest", "")),
            total_weight=float(aggregate["total_weight"]),
            round_number=final,
            contract=approved.contract,
            contract_hash=contract_hash,
            study_id=study_id,
            site_id=site_id,
            num_params=header.num_params,
            codec=codec,
            keys=roster_keys(
                approved.contract,
                site_id=site_id,
                own_signing_key=keys.signing_public_b64,
                peers=PeerStore(store.root.parent),
            ),
            ledger=ledger,
        )
    except AggregateRefusedError as exc:
        raise ReleaseError(
            f"the final aggregate does not check out: {exc.message}", code=exc.code
        ) from None
    except CryptoError as exc:
        raise ReleaseError(f"cannot decrypt the aggregate: {exc}", code="release.decrypt") from None
    except (KeyError, TypeError, ValueError):
        raise ReleaseError("the aggregate has no total weight", code="release.malformed") from None
    ledger.record_release(update.digest)
    return contract_hash, canonical_model_bytes(opened.params)


def check_on_record(
    client: ConsortiumClient,
    study_id: str,
    aggregate: dict[str, Any],
    *,
    witnessed: SignedTreeHead | None,
) -> None:
    """The aggregate offered for release must be the final round's on the audit log, in a
    head this site witnessed. Raises :class:`ReleaseError` (``release.not_on_record``,
    ``release.not_witnessed``)."""
    index = aggregate.get("audit_index")
    if not isinstance(index, int) or index < 0:
        raise ReleaseError(
            "the server names no audit entry for the final round", code="release.not_on_record"
        )
    if witnessed is None or index >= witnessed.tree_size:
        raise ReleaseError(
            "the final round's audit entry is not yet in a tree head this site witnessed; "
            "the agent cosigns the latest head and tries again",
            code="release.not_witnessed",
        )
    entry: dict[str, Any] = client.request(
        "GET", f"/api/v1/audit/entries/{index}", params={"tree_size": witnessed.tree_size}
    )
    try:
        raw = base64.b64decode(str(entry["entry_b64"]), validate=True)
        proof = [bytes.fromhex(str(p)) for p in entry["inclusion_proof"]]
        verify_inclusion(leaf_hash(raw), index, witnessed.tree_size, proof, witnessed.root)
        body = json.loads(raw)
        record = body["details"]["record"]
        named = (
            body["action"],
            body["object"]["id"],
            record["round_number"],
            record["aggregate_digest"],
        )
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidProofError):
        raise ReleaseError(
            "the audit entry the server names does not prove its place in the witnessed log",
            code="release.not_on_record",
        ) from None
    expected = (
        "round.completed",
        study_id,
        aggregate.get("round_number"),
        aggregate.get("digest"),
    )
    if named != expected:
        raise ReleaseError(
            "the witnessed audit log records another final aggregate for this study",
            code="release.not_on_record",
        )


def upload_layout(
    aggregate: dict[str, Any], spec: ModelSpec, *, num_params: int
) -> dict[str, Any] | None:
    """The layout (JSON) to upload with the decrypted model; ``None`` when the server names
    no input shape. Raises :class:`ReleaseError` (``release.layout_mismatch``) when the
    named input does not give the contract's network ``num_params`` parameters."""
    shape, classes = aggregate.get("input_shape"), aggregate.get("num_classes")
    if shape is None or classes is None:
        return None
    # Torch only here: the agent's other steps never build a network.
    from site_node.training.released import build_layout

    try:
        given, count = tuple(int(d) for d in shape), int(classes)
        layout = build_layout(spec, input_shape=given, num_classes=count, num_params=num_params)
    except (TypeError, ValueError):
        layout = None
    if layout is None:
        raise ReleaseError(
            f"the server's input shape {shape!r} and class count {classes!r} do not give "
            f"{spec.name} v{spec.version} the {num_params} parameters of the decrypted model",
            code="release.layout_mismatch",
        )
    return layout.model_dump(mode="json")


def sign_off(
    client: ConsortiumClient,
    study_id: str,
    *,
    site_id: str,
    keys: SiteKeyPair,
    store: ApprovalStore,
    upload: bool,
    witnessed: SignedTreeHead | None,
    sign: bool = True,
) -> SignOffResult:
    """Decrypt the study's final model, sign off its hash, and optionally upload it.

    ``sign=False`` only uploads: for a site that signed off but whose upload failed (the
    decrypted model is the same, so the hash it signed still holds).

    ``witnessed``: the latest tree head this site cosigned (its witness state). Raises
    :class:`ReleaseError` when the site refuses, and
    :class:`concord_protocol.client.ApiError` when the server does.
    """
    base = f"/api/v1/studies/{study_id}/release"
    aggregate: dict[str, Any] = client.request("GET", f"{base}/aggregate")
    check_on_record(client, study_id, aggregate, witnessed=witnessed)
    contract_hash, data = decrypt_final_model(
        aggregate, study_id, store=store, site_id=site_id, keys=keys
    )
    digest = model_sha256(data)
    message = signoff_message(
        study_id=study_id, contract_hash=contract_hash, model_sha256=digest, site_id=site_id
    )
    if sign:
        signature = base64.b64encode(keys.signing_key.sign(message)).decode("ascii")
        client.request(
            "POST",
            f"{base}/signoffs",
            json={"site_id": site_id, "model_sha256": digest, "signature": signature},
        )
    if upload:
        approved = store.get(contract_hash)
        assert approved is not None  # decrypt_final_model checked it
        body: dict[str, Any] = {"model_b64": base64.b64encode(data).decode("ascii")}
        layout = upload_layout(aggregate, approved.contract.model, num_params=len(data) // 8)
        if layout is not None:
            body["layout"] = layout
        client.request("POST", f"{base}/model", json=body)
    return SignOffResult(
        study_id=study_id,
        site_id=site_id,
        contract_hash=contract_hash,
        model_sha256=digest,
        num_params=len(data) // 8,
        uploaded=upload,
    )
