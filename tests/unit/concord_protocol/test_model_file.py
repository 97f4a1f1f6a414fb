"""The released model file: written so that the real safetensors library reads it, with the
signed bytes as its data section; read strictly; checked against card, contract and the
sites' signatures. (Hostile files and their refusals are in
tests/integration/attacks/test_released_model_attacks.py.)"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from concord_protocol.contract import ModelSpec
from concord_protocol.errors import ReleasedModelError
from concord_protocol.model_file import (
    FILE_FORMAT,
    ReleasedModelInfo,
    check_released_file,
    file_name,
    read_released_file,
    write_released_file,
)
from concord_protocol.release import (
    ModelLayout,
    canonical_model_bytes,
    model_sha256,
    signoff_message,
)

SPEC = ModelSpec(name="tabular-mlp", version="1", hyperparameters={"hidden": 4, "layers": 1})
LAYOUT = ModelLayout.model_validate(
    {
        "input_shape": [3],
        "num_classes": 2,
        "parameters": [
            {"name": "0.weight", "shape": [4, 3]},
            {"name": "0.bias", "shape": [4]},
            {"name": "2.weight", "shape": [2, 4]},
            {"name": "2.bias", "shape": [2]},
        ],
    }
)
SITES = ("hospital-a", "hospital-b", "hospital-c")


def _data() -> bytes:
    return canonical_model_bytes(np.linspace(-1.0, 1.0, LAYOUT.num_params))


def _info(data: bytes) -> ReleasedModelInfo:
    return ReleasedModelInfo(
        study_id="s-1",
        contract_hash="ab" * 32,
        model_sha256=model_sha256(data),
        spec=SPEC,
        input_shape=(3,),
        num_classes=2,
    )


def _keys() -> dict[str, Ed25519PrivateKey]:
    return {site: Ed25519PrivateKey.generate() for site in SITES}


def _public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _card(data: bytes, keys: dict[str, Ed25519PrivateKey], **model: Any) -> dict[str, Any]:
    digest = model_sha256(data)
    signoffs = []
    for site, key in keys.items():
        message = signoff_message(
            study_id="s-1", contract_hash="ab" * 32, model_sha256=digest, site_id=site
        )
        signoffs.append(
            {
                "site_id": site,
                "model_sha256": digest,
                "signature": base64.b64encode(key.sign(message)).decode(),
                "signed_at": "2026-12-01T00:00:00Z",
            }
        )
    return {
        "study_id": "s-1",
        "contract_hash": "ab" * 32,
        "title": "ignored by the check",
        "model": {
            "name": SPEC.name,
            "version": SPEC.version,
            "hyperparameters": dict(SPEC.hyperparameters),
            "sha256": digest,
            "encoding": "float64-le",
            "num_params": len(data) // 8,
            "size_bytes": len(data),
            "input_shape": [3],
            "num_classes": 2,
            **model,
        },
        "sites": list(keys),
        "signoffs": signoffs,
    }


def test_the_safetensors_library_reads_the_file_with_names_shapes_values_and_metadata() -> None:
    data = _data()
    blob = write_released_file(_info(data), LAYOUT, data)
    tensors = safetensors.numpy.load(blob)
    assert set(tensors) == {p.name for p in LAYOUT.parameters}
    flat = np.frombuffer(data, dtype="<f8")
    offset = 0
    for parameter in LAYOUT.parameters:  # vector order, each tensor row-major
        tensor = tensors[parameter.name]
        assert tensor.dtype == np.float64
        assert tensor.shape == parameter.shape
        np.testing.assert_array_equal(tensor.reshape(-1), flat[offset : offset + parameter.numel])
        offset += parameter.numel
    (size,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8 : 8 + size])["__metadata__"]
    assert metadata["concord.file"] == FILE_FORMAT
    assert metadata["concord.model_sha256"] == model_sha256(data)
    assert json.loads(metadata["concord.model"]) == SPEC.model_dump(mode="json")
    assert json.loads(metadata["concord.input_shape"]) == [3]
    assert metadata["concord.num_classes"] == "2"
    assert metadata["format"] == "pt"


def test_the_data_section_is_the_signed_bytes_and_the_file_is_deterministic() -> None:
    data = _data()
    blob = write_released_file(_info(data), LAYOUT, data)
    (size,) = struct.unpack("<Q", blob[:8])
    assert size % 8 == 0  # padded with spaces, as the library pads
    assert blob[8 + size :] == data
    assert hashlib.sha256(blob[8 + size :]).hexdigest() == model_sha256(data)
    assert write_released_file(_info(data), LAYOUT, data) == blob
    file = check_released_file(blob)
    assert file.info == _info(data)
    assert [(t.name, t.shape) for t in file.tensors] == [
        (p.name, p.shape) for p in LAYOUT.parameters
    ]
    assert file_name("s-1", SPEC) == "s-1-tabular-mlp-v1.safetensors"


def test_the_writer_refuses_a_layout_or_hash_that_does_not_fit() -> None:
    data = _data()
    with pytest.raises(ValueError, match="layout holds"):
        write_released_file(_info(data), LAYOUT, data + b"\0" * 8)
    with pytest.raises(ValueError, match="hash"):
        write_released_file(_info(data), LAYOUT, data[::-1])


def test_a_layout_needs_unique_names_within_bounds() -> None:
    one = {"name": "w", "shape": [2]}
    ModelLayout.model_validate({"input_shape": [1], "num_classes": 2, "parameters": [one]})
    bad: list[dict[str, Any]] = [
        {"parameters": [one, one]},
        {"parameters": [{"name": "__metadata__", "shape": [2]}]},
        {"parameters": [{"name": "w x", "shape": [2]}]},
        {"parameters": [{"name": "w", "shape": [0]}]},
        {"parameters": [{"name": "w", "shape": [1] * 9}]},
        {"parameters": []},
        {"parameters": [one], "input_shape": []},
        {"parameters": [one], "num_classes": 1},
        {"parameters": [one], "extra": 1},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            ModelLayout.model_validate({"input_shape": [1], "num_classes": 2, **fields})


def test_the_card_contract_and_sign_offs_are_checked() -> None:
    data = _data()
    blob = write_released_file(_info(data), LAYOUT, data)
    keys = _keys()
    card = _card(data, keys)
    public = {site: _public(key) for site, key in keys.items()}
    check_released_file(
        blob, card=card, contract_hash="ab" * 32, model_spec=SPEC, signing_keys=public
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({**card, "contract_hash": "cd" * 32}, "released_model.card_mismatch"),
        ({**card, "study_id": "s-2"}, "released_model.card_mismatch"),
        (_card(data, keys, hyperparameters={"hidden": 8}), "released_model.card_mismatch"),
        (_card(data, keys, num_params=3), "released_model.card_mismatch"),
        (_card(data, keys, input_shape=[4]), "released_model.card_mismatch"),
        (_card(data, keys, sha256="00" * 32), "released_model.card_mismatch"),
        ({**card, "signoffs": []}, "released_model.card_mismatch"),
        ({"study_id": "s-1"}, "released_model.card_mismatch"),
    ]
    for bad, code in cases:
        with pytest.raises(ReleasedModelError) as refused:
            check_released_file(blob, card=bad)
        assert refused.value.code == code, bad
    with pytest.raises(ReleasedModelError) as refused:
        check_released_file(blob, contract_hash="cd" * 32)
    assert refused.value.code == "released_model.contract_mismatch"
    other = SPEC.model_copy(update={"hyperparameters": {"hidden": 4, "layers": 2}})
    with pytest.raises(ReleasedModelError) as refused:
        check_released_file(blob, model_spec=other)
    assert refused.value.code == "released_model.contract_mismatch"
    with pytest.raises(ValueError, match="pass card"):
        check_released_file(blob, signing_keys=public)


def test_a_sign_off_must_verify_with_the_pinned_key_of_every_site() -> None:
    data = _data()
    blob = write_released_file(_info(data), LAYOUT, data)
    keys = _keys()
    card = _card(data, keys)
    public = {site: _public(key) for site, key in keys.items()}
    # A site's keys before and after a rotation (as `site-node peers export-keys` lists
    # them): a sign-off made with either verifies.
    rotated = {
        **public,
        "hospital-a": [_public(Ed25519PrivateKey.generate()), public["hospital-a"]],
    }
    check_released_file(blob, card=card, signing_keys=rotated)
    wrong_key = {**public, "hospital-b": _public(Ed25519PrivateKey.generate())}
    missing_key = {s: k for s, k in public.items() if s != "hospital-c"}
    no_signoff = {**card, "signoffs": card["signoffs"][:2]}
    garbled = {**card, "signoffs": [{**card["signoffs"][0], "signature": "!!"}]}
    for bad_card, bad_keys in (
        (card, wrong_key),
        (card, missing_key),
        (no_signoff, public),
        (garbled, public),
        (card, {**public, "hospital-a": "not a key"}),
    ):
        with pytest.raises(ReleasedModelError) as refused:
            check_released_file(blob, card=bad_card, signing_keys=bad_keys)
        assert refused.value.code == "released_model.signoff_invalid"


def test_reading_refuses_what_is_not_a_released_model_file() -> None:
    data = _data()
    blob = write_released_file(_info(data), LAYOUT, data)
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])

    def rebuilt(new_header: dict[str, Any], body: bytes = data) -> bytes:
        raw = json.dumps(new_header).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    metadata = header["__metadata__"]
    files = [
        b"",
        blob[:7],
        struct.pack("<Q", 2**63) + blob[8:],  # hostile header length
        struct.pack("<Q", len(blob)) + blob[8:],  # past the end
        struct.pack("<Q", 1) + blob[8:],
        struct.pack("<Q", 4) + b"[1] " + data,  # not an object
        struct.pack("<Q", 4) + b"\xff\xfe{}" + data,  # not UTF-8
        rebuilt({k: v for k, v in header.items() if k != "__metadata__"}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.num_classes": 2}}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.file": "other/1"}}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.encoding": "float32-le"}}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.model": "{"}}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.input_shape": "[0]"}}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.num_classes": "1"}}),
        rebuilt({**header, "__metadata__": {**metadata, "concord.model_sha256": "x"}}),
        rebuilt({"__metadata__": metadata}),  # no tensors, data uncovered
        rebuilt(header, data + b"\0" * 8),  # data past the last tensor
        rebuilt(header, data[:-8]),  # truncated data
        rebuilt({**header, "0.bias": {**header["0.bias"], "dtype": "F32"}}),
        rebuilt({**header, "0.bias": {**header["0.bias"], "extra": 1}}),
        rebuilt({**header, "0.bias": {**header["0.bias"], "shape": [5]}}),
        rebuilt({**header, "0.bias": {**header["0.bias"], "shape": [-4]}}),
        rebuilt({**header, "0.bias": {**header["0.bias"], "data_offsets": [96]}}),
        rebuilt({**header, "0.bias": {**header["0.bias"], "data_offsets": [88, 120]}}),
        rebuilt({**header, "0.bias": {**header["0.bias"], "data_offsets": [True, 128]}}),
    ]
    duplicate = json.dumps(header)[:-1] + ', "0.bias": ' + json.dumps(header["0.bias"]) + "}"
    files.append(struct.pack("<Q", len(duplicate)) + duplicate.encode() + data)
    nan = json.dumps(header).replace('"shape": [4]', '"shape": [NaN]', 1)
    files.append(struct.pack("<Q", len(nan)) + nan.encode() + data)
    for i, bad in enumerate(files):
        with pytest.raises(ReleasedModelError) as refused:
            read_released_file(bad)
        assert refused.value.code == "released_model.malformed", i
