"""Attacks on the released model file by a malicious server: what the researcher's loader
(:func:`site_node.training.released.load_released_model`) refuses, and what it needs to be
given to refuse it.

No processes: the attacker rewrites the bytes of a file the honest server wrote (header,
metadata, data) and, where it helps, the model card too (the server serves both). The
researcher holds what the server cannot forge: the contract they submitted and the sites'
signing keys they pinned out of band.

What the file alone proves is little (its data hash to the hash its own metadata names);
with the card, contract and keys the loaded network is the catalogue network of the
contract, with the weights every site signed, in the layers they came from.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from concord_protocol.contract import ModelSpec
from concord_protocol.errors import ReleasedModelError
from concord_protocol.model_file import ReleasedModelInfo, write_released_file
from concord_protocol.release import canonical_model_bytes, model_sha256, signoff_message
from site_node.training import build_model, flatten, unflatten_into
from site_node.training.released import layout_of, load_released_model

pytestmark = [pytest.mark.integration]

# Two hidden layers of 16: 0.bias and 2.bias have the same shape, as do many tensors of any
# real network.
SPEC = ModelSpec(name="tabular-mlp", version="1", hyperparameters={"hidden": 16, "layers": 2})
SHAPE = (30,)
SITES = ("hospital-a", "hospital-b", "hospital-c")
CONTRACT_HASH = "ab" * 32


class Study:
    """A released model as the honest server writes it, its card, and the sites' keys."""

    def __init__(self) -> None:
        self.model = build_model(SPEC, input_shape=SHAPE, num_classes=2)
        rng = np.random.default_rng(11)
        unflatten_into(self.model, rng.normal(0, 0.3, flatten(self.model).shape[0]))
        self.model.eval()
        self.data = canonical_model_bytes(flatten(self.model))
        self.keys = {site: Ed25519PrivateKey.generate() for site in SITES}
        self.blob = self.write(self.data)
        self.card = self.card_for(self.data)

    @property
    def pinned(self) -> dict[str, str]:
        """The sites' public signing keys, as the researcher pinned them."""
        return {
            site: base64.b64encode(
                key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            ).decode()
            for site, key in self.keys.items()
        }

    def write(self, data: bytes, spec: ModelSpec = SPEC, **info: Any) -> bytes:
        fields: dict[str, Any] = {
            "study_id": "s-1",
            "contract_hash": CONTRACT_HASH,
            "model_sha256": model_sha256(data),
            "spec": spec,
            "input_shape": SHAPE,
            "num_classes": 2,
            **info,
        }
        layout = layout_of(self.model, input_shape=SHAPE, num_classes=2)
        return write_released_file(ReleasedModelInfo(**fields), layout, data)

    def card_for(
        self, data: bytes, spec: ModelSpec = SPEC, *, forge: bool = False
    ) -> dict[str, Any]:
        """The card; ``forge``: the server's card for other data, sign-offs copied from the
        honest card (it cannot sign for the sites)."""
        digest = model_sha256(data)
        signoffs = []
        for site, key in self.keys.items():
            message = signoff_message(
                study_id="s-1", contract_hash=CONTRACT_HASH, model_sha256=digest, site_id=site
            )
            signature = key.sign(message) if not forge else self.signature(site)
            signoffs.append(
                {
                    "site_id": site,
                    "model_sha256": digest,
                    "signature": base64.b64encode(signature).decode(),
                }
            )
        return {
            "study_id": "s-1",
            "contract_hash": CONTRACT_HASH,
            "model": {
                "name": spec.name,
                "version": spec.version,
                "hyperparameters": dict(spec.hyperparameters),
                "sha256": digest,
                "encoding": "float64-le",
                "num_params": len(data) // 8,
                "input_shape": list(SHAPE),
                "num_classes": 2,
            },
            "sites": list(SITES),
            "signoffs": signoffs,
        }

    def signature(self, site: str) -> bytes:
        honest = next(s for s in self.card["signoffs"] if s["site_id"] == site)
        return base64.b64decode(honest["signature"])


@pytest.fixture(scope="module")
def study() -> Study:
    return Study()


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _join(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _refused(blob: bytes, code: str, **given: Any) -> None:
    with pytest.raises(ReleasedModelError) as refused:
        load_released_model(blob, **given)
    assert refused.value.code == code


def _contract_like(study: Study, spec: ModelSpec = SPEC) -> Any:
    """Stands in for the researcher's StudyContract (its hash and model spec)."""

    class Contract:
        model = spec

        @staticmethod
        def contract_hash() -> str:
            return CONTRACT_HASH

    return Contract()


def test_the_honest_file_loads_with_every_check(study: Study) -> None:
    loaded = load_released_model(
        study.blob, card=study.card, contract=_contract_like(study), signing_keys=study.pinned
    )
    batch = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), study.model(batch), rtol=0, atol=0)


def test_swapped_tensors_of_the_same_shape_are_refused(study: Study) -> None:
    """The server swaps two same-shaped tensors in the header: the data (and so the signed
    hash) are untouched, and any safetensors reader loads the biases into each other's
    layers. The loader rebuilds where the network keeps each tensor and refuses."""
    header, data = _split(study.blob)
    first, second = header["0.bias"], header["2.bias"]
    assert first["shape"] == second["shape"]
    header["0.bias"], header["2.bias"] = second, first
    swapped = _join(header, data)
    tensors = safetensors.numpy.load(swapped)  # the standard reader takes it
    np.testing.assert_array_equal(
        tensors["0.bias"], study.model.state_dict()["2.bias"].double().numpy()
    )
    _refused(swapped, "released_model.layout_mismatch")
    _refused(
        swapped,
        "released_model.layout_mismatch",
        card=study.card,
        contract=_contract_like(study),
        signing_keys=study.pinned,
    )


def test_renamed_or_reordered_tensors_are_refused(study: Study) -> None:
    header, data = _split(study.blob)
    renamed = dict(header)
    renamed["0.extra"] = renamed.pop("0.bias")
    _refused(_join(renamed, data), "released_model.layout_mismatch")
    shaped = dict(header)  # same size, other shape: (16, 30) as (30, 16)
    shaped["0.weight"] = {**header["0.weight"], "shape": [30, 16]}
    _refused(_join(shaped, data), "released_model.layout_mismatch")


def test_swapped_data_is_caught_by_the_hash_and_then_only_by_the_sites_signatures(
    study: Study,
) -> None:
    """The server swaps the two biases' bytes and keeps the header: the names now hold the
    wrong data. The file's own hash catches it; a server that also rewrites the hash in the
    metadata and the card is caught only by the sites' signatures."""
    header, data = _split(study.blob)
    a, b = header["0.bias"]["data_offsets"], header["2.bias"]["data_offsets"]
    swapped = bytearray(data)
    swapped[a[0] : a[1]], swapped[b[0] : b[1]] = data[b[0] : b[1]], data[a[0] : a[1]]
    forged = bytes(swapped)
    _refused(_join(header, forged), "released_model.hash_mismatch")
    rehashed = study.write(forged)
    forged_card = study.card_for(forged, forge=True)
    load_released_model(rehashed, card=forged_card)  # without keys: nothing to catch it
    _refused(
        rehashed,
        "released_model.signoff_invalid",
        card=forged_card,
        signing_keys=study.pinned,
    )
    _refused(rehashed, "released_model.card_mismatch", card=study.card)  # the honest card


def test_a_tampered_model_spec_is_refused_by_the_card_and_the_contract(study: Study) -> None:
    """Changing the activation keeps every tensor's shape: the file alone cannot tell. The
    card the server served with the honest file, and the contract, can; a server that
    rewrites the card too is caught by the contract you submitted."""
    relu = SPEC.model_copy(
        update={"hyperparameters": {**SPEC.hyperparameters, "activation": "relu"}}
    )
    tampered = study.write(study.data, spec=relu)
    load_released_model(tampered)  # loads, as the wrong network: pass the card or contract
    _refused(tampered, "released_model.card_mismatch", card=study.card)
    _refused(tampered, "released_model.contract_mismatch", contract=_contract_like(study))
    rewritten_card = study.card_for(study.data, spec=relu)
    _refused(
        tampered,
        "released_model.contract_mismatch",
        card=rewritten_card,
        signing_keys=study.pinned,
        contract=_contract_like(study),
    )


def test_a_wrong_hash_or_changed_byte_is_refused(study: Study) -> None:
    header, data = _split(study.blob)
    changed = bytearray(data)
    changed[-1] ^= 1
    _refused(_join(header, bytes(changed)), "released_model.hash_mismatch")
    other = {**header["__metadata__"], "concord.model_sha256": "00" * 32}
    _refused(_join({**header, "__metadata__": other}, data), "released_model.hash_mismatch")


def test_a_truncated_file_or_hostile_header_length_is_refused_at_once(study: Study) -> None:
    for cut in (0, 5, 8, 100, len(study.blob) - 8, len(study.blob) - 1):
        _refused(study.blob[:cut], "released_model.malformed")
    started = time.monotonic()
    for size in (2**64 - 1, 2**40, 17 * 1024 * 1024):
        _refused(struct.pack("<Q", size) + study.blob[8:], "released_model.malformed")
    assert time.monotonic() - started < 1.0  # nothing read or allocated for the claim


def test_a_claimed_huge_network_is_sized_before_it_is_built(study: Study) -> None:
    """Metadata naming a billion input features (data hash intact): the loader computes the
    catalogue's parameter count and refuses, without building the network."""
    header, data = _split(study.blob)
    metadata = {**header["__metadata__"], "concord.input_shape": json.dumps([10**9])}
    started = time.monotonic()
    _refused(_join({**header, "__metadata__": metadata}, data), "released_model.layout_mismatch")
    assert time.monotonic() - started < 1.0
    unknown = {**header["__metadata__"], "concord.model": '{"name":"vit","version":"1"}'}
    _refused(_join({**header, "__metadata__": unknown}, data), "released_model.layout_mismatch")


def test_other_dtypes_extra_tensors_and_non_finite_weights_are_refused(study: Study) -> None:
    header, data = _split(study.blob)
    f32 = {**header, "0.bias": {**header["0.bias"], "dtype": "F32"}}
    _refused(_join(f32, data), "released_model.malformed")
    end = header["4.bias"]["data_offsets"][1]
    longer = data + b"\0" * 8  # one more tensor, the hash in the metadata made to fit
    metadata = {**header["__metadata__"], "concord.model_sha256": model_sha256(longer)}
    extra = {
        **header,
        "__metadata__": metadata,
        "buffer": {"dtype": "F64", "shape": [1], "data_offsets": [end, end + 8]},
    }
    _refused(_join(extra, longer), "released_model.layout_mismatch")
    nan = bytearray(data)
    nan[:8] = struct.pack("<d", float("nan"))
    _refused(study.write(bytes(nan)), "released_model.malformed")
