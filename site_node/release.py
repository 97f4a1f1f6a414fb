"""The site's part of the release gate: decrypt the final aggregate, sign off its hash.

::

    from site_node.release import sign_off
    result = sign_off(api, study_id, site_id="hospital-a", keys=keys, store=store, upload=True)

Steps (see :mod:`consortium_server.release` for the shared definitions):

1. fetch the final aggregate (``GET /api/v1/studies/{id}/release/aggregate``);
2. check it: this site approved its contract hash for this study, the wire format is
   intact (every chunk digest, the update digest) and names this study and contract, and
   an encrypted contract came back encrypted (the server cannot downgrade to ``plain``);
3. decrypt it with the study key from the site's :class:`ApprovalStore` (the result is
   the same at every site: decryption rounds to a grid, docs/crypto.md);
4. hash the canonical model bytes (little-endian float64) and sign
   ``canonical_json({study_id, contract_hash, model_sha256, site_id})`` with the site's
   Ed25519 signing key; post the sign-off;
5. with ``upload=True``, upload the model bytes too (one site is enough).

Nothing here logs parameter values.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from concord_protocol.client import ConsortiumClient
from concord_protocol.release import canonical_model_bytes, model_sha256, signoff_message
from concord_protocol.wire.format import EncodedUpdate
from site_node.crypto.codecs import CkksCodec, PlainCodec, UpdateCodec
from site_node.crypto.errors import CryptoError
from site_node.crypto.sealing import SiteKeyPair
from site_node.errors import SiteError
from site_node.federation.approvals import ApprovalStore

__all__ = ["ReleaseError", "SignOffResult", "decrypt_final_model", "sign_off"]


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
    aggregate: dict[str, Any], study_id: str, *, store: ApprovalStore
) -> tuple[str, bytes]:
    """Check and decrypt the server's final aggregate; returns (contract hash, model bytes).

    Raises :class:`ReleaseError` when this site did not approve the contract, the aggregate
    is not for this study, or it cannot be decrypted.
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
        )
        if not ok
    ]
    if mismatches:
        raise ReleaseError(
            f"the aggregate does not match: {', '.join(mismatches)}", code="release.mismatch"
        )
    codec: UpdateCodec
    if approved.contract.encryption.enabled:
        if header.scheme != "ckks":
            raise ReleaseError(
                "the contract requires encryption but the aggregate is plain",
                code="release.mismatch",
            )
        key = store.study_key(study_id)
        if key is None:
            raise ReleaseError(f"no study key for {study_id} at this site", code="release.no_key")
        codec = CkksCodec(key.secret_context)
    else:
        codec = PlainCodec(chunk_size=header.chunk_size)
    try:
        vector = codec.decrypt_aggregate(
            update.chunks,
            num_params=header.num_params,
            total_weight=float(aggregate["total_weight"]),
        )
    except CryptoError as exc:
        raise ReleaseError(f"cannot decrypt the aggregate: {exc}", code="release.decrypt") from None
    return contract_hash, canonical_model_bytes(vector)


def sign_off(
    client: ConsortiumClient,
    study_id: str,
    *,
    site_id: str,
    keys: SiteKeyPair,
    store: ApprovalStore,
    upload: bool,
) -> SignOffResult:
    """Decrypt the study's final model, sign off its hash, and optionally upload it.

    Raises :class:`ReleaseError` when the site refuses, and
    :class:`concord_protocol.client.ApiError` when the server does.
    """
    base = f"/api/v1/studies/{study_id}/release"
    aggregate: dict[str, Any] = client.request("GET", f"{base}/aggregate")
    contract_hash, data = decrypt_final_model(aggregate, study_id, store=store)
    digest = model_sha256(data)
    message = signoff_message(
        study_id=study_id, contract_hash=contract_hash, model_sha256=digest, site_id=site_id
    )
    signature = base64.b64encode(keys.signing_key.sign(message)).decode("ascii")
    client.request(
        "POST",
        f"{base}/signoffs",
        json={"site_id": site_id, "model_sha256": digest, "signature": signature},
    )
    if upload:
        client.request(
            "POST", f"{base}/model", json={"model_b64": base64.b64encode(data).decode("ascii")}
        )
    return SignOffResult(
        study_id=study_id,
        site_id=site_id,
        contract_hash=contract_hash,
        model_sha256=digest,
        num_params=len(data) // 8,
        uploaded=upload,
    )
