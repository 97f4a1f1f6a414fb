"""The released model as a standard file: safetensors, written and read byte for byte here.

The server writes the file (it has no torch and needs no safetensors library: the format is
an 8-byte little-endian header length, a JSON header, then the data); researchers read it
with :func:`site_node.training.released.load_released_model`, or with any safetensors
reader. Both sides must agree on every byte, so both use this module.

Layout of a file:

* the JSON header names each parameter of the catalogue network (``dtype`` ``F64``, its
  ``shape`` and ``data_offsets``), in the order of the flat parameter vector, and a
  ``__metadata__`` map of strings: the model spec (catalogue name, version,
  hyperparameters), input shape, class count, study id, contract hash, model hash and
  encoding (:class:`ReleasedModelInfo`);
* the header is padded with spaces to a multiple of 8 bytes (as the safetensors library
  writes it);
* the data section is **exactly the canonical model bytes** every site signed off
  (:func:`concord_protocol.release.canonical_model_bytes`): the tensors lie back to back in
  vector order, each row-major, so ``sha256(data section)`` is the model hash on the card.

Reading is strict (:func:`read_released_file`): a header length beyond the file or above
:data:`MAX_HEADER_BYTES`, JSON that is not an object, a duplicate key, a dtype other than
``F64``, offsets that leave a gap, overlap or run past the data, metadata that is missing
or not strings: each is :class:`~concord_protocol.errors.ReleasedModelError`
(``released_model.malformed``) before anything is allocated for the tensors.
:func:`check_released_file` then compares the file with the model card (and, when given,
the contract and the sites' signing keys). What it cannot know is which tensor is which:
that needs the catalogue network, so the loader rebuilds the expected layout and refuses a
file whose header differs (``released_model.layout_mismatch``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from pydantic import BaseModel, ConfigDict, ValidationError

from concord_protocol.audit.heads import decode_public_key
from concord_protocol.canonical import canonical_json
from concord_protocol.contract import ModelSpec
from concord_protocol.errors import ConcordError, ReleasedModelError
from concord_protocol.release import (
    MODEL_ENCODING,
    ModelLayout,
    model_sha256,
    signoff_message,
)

__all__ = [
    "FILE_FORMAT",
    "MAX_HEADER_BYTES",
    "CardClaims",
    "ReleasedFile",
    "ReleasedModelInfo",
    "TensorEntry",
    "check_released_file",
    "expected_tensors",
    "file_name",
    "read_released_file",
    "write_released_file",
]

#: ``__metadata__["concord.file"]``: this layout of a released model file.
FILE_FORMAT = "concord.released-model/1"
#: The largest header read (the catalogue's largest network needs about 40 KB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: safetensors' name of the float64 dtype, and its size.
DTYPE = "F64"
_ITEM = 8
_METADATA_KEYS = frozenset(
    {
        "format",
        "concord.file",
        "concord.study_id",
        "concord.contract_hash",
        "concord.model_sha256",
        "concord.encoding",
        "concord.model",
        "concord.input_shape",
        "concord.num_classes",
    }
)


def _malformed(message: str) -> ReleasedModelError:
    return ReleasedModelError(message, code="released_model.malformed")


@dataclass(frozen=True)
class ReleasedModelInfo:
    """What the file's ``__metadata__`` says about the model (all of it, typed)."""

    study_id: str
    contract_hash: str
    model_sha256: str
    spec: ModelSpec
    input_shape: tuple[int, ...]
    num_classes: int
    encoding: str = MODEL_ENCODING

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` map (safetensors allows strings only: JSON inside)."""
        return {
            "format": "pt",
            "concord.file": FILE_FORMAT,
            "concord.study_id": self.study_id,
            "concord.contract_hash": self.contract_hash,
            "concord.model_sha256": self.model_sha256,
            "concord.encoding": self.encoding,
            "concord.model": canonical_json(self.spec.model_dump(mode="json")).decode("utf-8"),
            "concord.input_shape": json.dumps(list(self.input_shape)),
            "concord.num_classes": str(self.num_classes),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ReleasedModelInfo:
        """Parse ``__metadata__``; raises ``released_model.malformed``."""
        missing = sorted(_METADATA_KEYS - set(metadata))
        if missing:
            raise _malformed(f"the file's metadata lacks {', '.join(missing)}")
        if metadata["concord.file"] != FILE_FORMAT:
            raise _malformed(
                f"the file is {metadata['concord.file']!r}, this reader knows {FILE_FORMAT!r}"
            )
        if metadata["concord.encoding"] != MODEL_ENCODING:
            raise _malformed(f"unknown parameter encoding {metadata['concord.encoding']!r}")
        try:
            spec = ModelSpec.model_validate_json(metadata["concord.model"])
            shape = json.loads(metadata["concord.input_shape"])
            classes = int(metadata["concord.num_classes"])
            # The bounds of an uploaded layout (concord_protocol.release.ModelLayout).
            if not isinstance(shape, list) or not 1 <= len(shape) <= 5:
                raise ValueError("input shape")
            if not all(_int(d) and 1 <= d < 2**31 for d in shape) or not 2 <= classes <= 100_000:
                raise ValueError("input shape or class count")
        except (ValidationError, ValueError):
            raise _malformed(
                "the file's model spec, input shape or class count does not parse"
            ) from None
        digest = metadata["concord.model_sha256"]
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise _malformed("the file's model hash is not a SHA-256 hex digest")
        return cls(
            study_id=metadata["concord.study_id"],
            contract_hash=metadata["concord.contract_hash"],
            model_sha256=digest,
            spec=spec,
            input_shape=tuple(shape),
            num_classes=classes,
        )


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: name, shape and its byte range in the data section."""

    name: str
    shape: tuple[int, ...]
    begin: int
    end: int
    dtype: str = DTYPE


@dataclass(frozen=True)
class ReleasedFile:
    """A parsed file: its metadata, its tensors in data order, and the data section."""

    info: ReleasedModelInfo
    tensors: tuple[TensorEntry, ...]
    data: bytes

    @property
    def num_params(self) -> int:
        """Number of float64 values in the data section."""
        return len(self.data) // _ITEM


def expected_tensors(layout: Iterable[tuple[str, Sequence[int]]]) -> tuple[TensorEntry, ...]:
    """The header entries of ``layout`` (``(name, shape)`` in vector order): back to back,
    from offset 0, 8 bytes per value."""
    out: list[TensorEntry] = []
    offset = 0
    for name, shape in layout:
        dims = tuple(int(d) for d in shape)
        size = _ITEM * math.prod(dims)
        out.append(TensorEntry(name=name, shape=dims, begin=offset, end=offset + size))
        offset += size
    return tuple(out)


def file_name(study_id: str, spec: ModelSpec) -> str:
    """The download's file name: study and catalogue network (``s-1-tabular-mlp-v1``)."""
    return f"{study_id}-{spec.name}-v{spec.version}.safetensors"


def write_released_file(info: ReleasedModelInfo, layout: ModelLayout, data: bytes) -> bytes:
    """The safetensors file of the released model ``data`` (the canonical model bytes).

    Raises ``ValueError`` when the layout does not cover ``data`` exactly or ``data`` does
    not hash to ``info.model_sha256`` (the server checked both at upload).
    """
    if _ITEM * layout.num_params != len(data):
        raise ValueError(f"the layout holds {layout.num_params} values, the data {len(data)} bytes")
    if model_sha256(data) != info.model_sha256:
        raise ValueError("the data does not hash to the model hash")
    header: dict[str, Any] = {"__metadata__": info.metadata()}
    for entry in expected_tensors((p.name, p.shape) for p in layout.parameters):
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _malformed(f"the header names {key!r} twice")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise _malformed(f"the header holds {name}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(name: str, entry: Any, data_size: int) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _malformed(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if entry["dtype"] != DTYPE:
        raise _malformed(f"tensor {name!r} is {entry['dtype']!r}; released models are {DTYPE}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_int(d) for d in shape):
        raise _malformed(f"tensor {name!r} has no valid shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets):
        raise _malformed(f"tensor {name!r} has no valid data_offsets")
    begin, end = offsets
    if not begin <= end <= data_size or end - begin != _ITEM * math.prod(shape):
        raise _malformed(f"tensor {name!r}: its offsets do not fit its shape and the data")
    return TensorEntry(name=name, shape=tuple(shape), begin=begin, end=end)


def read_released_file(blob: bytes) -> ReleasedFile:
    """Parse a released model file; raises ``released_model.malformed`` (see the module).

    Checks the format only; :func:`check_released_file` checks it against a card, and the
    loader against the catalogue network.
    """
    if len(blob) < 8:
        raise _malformed("the file is shorter than its header length")
    (size,) = struct.unpack("<Q", blob[:8])
    if size < 2 or size > MAX_HEADER_BYTES or 8 + size > len(blob):
        raise _malformed(f"the header length ({size} bytes) does not fit the file")
    try:
        header = json.loads(
            blob[8 : 8 + size].decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed("the header is not JSON") from None
    if not isinstance(header, dict):
        raise _malformed("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _malformed("the header has no __metadata__ map of strings")
    data = blob[8 + size :]
    tensors = sorted(
        (_tensor(name, entry, len(data)) for name, entry in header.items()),
        key=lambda t: (t.begin, t.end),
    )
    position = 0
    for tensor in tensors:
        if tensor.begin != position:
            raise _malformed("the tensors' data overlap or leave a gap")
        position = tensor.end
    if position != len(data) or not tensors:
        raise _malformed("the tensors do not cover the data section exactly")
    return ReleasedFile(
        info=ReleasedModelInfo.from_metadata(metadata), tensors=tuple(tensors), data=data
    )


class CardClaims(BaseModel):
    """What a model card (``GET .../release/card``) says that a file is checked against.

    Other fields of the card are ignored here (the full card is
    ``consortium_server.release.card.ModelCard``).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    class Model(BaseModel):
        """The card's ``model`` section."""

        model_config = ConfigDict(extra="ignore", frozen=True)

        name: str
        version: str
        hyperparameters: dict[str, Any]
        sha256: str
        encoding: str
        num_params: int
        input_shape: list[int] | None = None
        num_classes: int | None = None

    class Signoff(BaseModel):
        """One site's sign-off on the card."""

        model_config = ConfigDict(extra="ignore", frozen=True)

        site_id: str
        model_sha256: str
        signature: str

    study_id: str
    contract_hash: str
    model: Model
    sites: list[str]
    signoffs: list[Signoff]


def _card_problems(file: ReleasedFile, card: CardClaims) -> list[str]:
    info = file.info
    try:
        spec = ModelSpec(
            name=card.model.name,
            version=card.model.version,
            hyperparameters=card.model.hyperparameters,
        )
    except ValidationError:
        return ["the card's model spec does not parse"]
    checks = [
        ("study id", card.study_id == info.study_id),
        ("contract hash", card.contract_hash == info.contract_hash),
        ("model hash", card.model.sha256 == info.model_sha256),
        ("model spec", spec == info.spec),
        ("encoding", card.model.encoding == info.encoding),
        ("parameter count", card.model.num_params == file.num_params),
        (
            "input shape",
            card.model.input_shape is None or tuple(card.model.input_shape) == info.input_shape,
        ),
        (
            "class count",
            card.model.num_classes is None or card.model.num_classes == info.num_classes,
        ),
        (
            "sign-offs",
            bool(card.signoffs) and all(s.model_sha256 == info.model_sha256 for s in card.signoffs),
        ),
    ]
    return [name for name, ok in checks if not ok]


def _verifies(key: str, signature: str, message: bytes) -> bool:
    try:
        decode_public_key(key).verify(base64.b64decode(signature, validate=True), message)
    except (binascii.Error, ValueError, InvalidSignature, ConcordError):
        return False
    return True


def _check_signoffs(
    info: ReleasedModelInfo, card: CardClaims, keys: Mapping[str, str | Sequence[str]]
) -> None:
    """Every site of the card signed ``info.model_sha256`` with a key given for it."""
    signed: set[str] = set()
    for signoff in card.signoffs:
        given = keys.get(signoff.site_id)
        if given is None:
            continue
        message = signoff_message(
            study_id=info.study_id,
            contract_hash=info.contract_hash,
            model_sha256=info.model_sha256,
            site_id=signoff.site_id,
        )
        trusted = [given] if isinstance(given, str) else list(given)
        if not any(_verifies(key, signoff.signature, message) for key in trusted):
            raise ReleasedModelError(
                f"{signoff.site_id}'s sign-off does not verify with the key given for it",
                code="released_model.signoff_invalid",
            )
        signed.add(signoff.site_id)
    unsigned = sorted(set(card.sites) - signed)
    if unsigned:
        raise ReleasedModelError(
            f"no verified sign-off from {', '.join(unsigned)} (every site of the study must "
            "have signed the model hash with the key you hold for it)",
            code="released_model.signoff_invalid",
        )


def check_released_file(
    blob: bytes,
    *,
    card: Mapping[str, Any] | None = None,
    contract_hash: str | None = None,
    model_spec: ModelSpec | None = None,
    signing_keys: Mapping[str, str | Sequence[str]] | None = None,
) -> ReleasedFile:
    """Parse ``blob`` and check it: the data hash to the model hash its metadata names,
    and, when given, agrees with the card, the contract and the sites' signatures.

    ``card``: the model card (JSON). ``contract_hash``/``model_spec``: of the contract you
    submitted (``StudyContract.contract_hash()``, ``.model``). ``signing_keys``: site id ->
    Ed25519 public key (base64), or the list of keys a site used (rotations), of each site
    as you got them out of band, e.g. a hospital's ``site-node peers export-keys`` file
    (needs ``card``): every site on the card must have signed this model hash. Without them the
    check trusts the server for which model the sites signed; with them, nobody but the
    sites can choose it.

    Raises :class:`~concord_protocol.errors.ReleasedModelError`.
    """
    file = read_released_file(blob)
    info = file.info
    if model_sha256(file.data) != info.model_sha256:
        raise ReleasedModelError(
            "the parameters do not hash to the model hash the file names",
            code="released_model.hash_mismatch",
        )
    if card is not None:
        try:
            claims = CardClaims.model_validate(card)
        except ValidationError:
            raise ReleasedModelError(
                "the model card does not parse", code="released_model.card_mismatch"
            ) from None
        problems = _card_problems(file, claims)
        if problems:
            raise ReleasedModelError(
                f"the file and the model card disagree on: {', '.join(problems)}",
                code="released_model.card_mismatch",
            )
        if signing_keys is not None:
            _check_signoffs(info, claims, signing_keys)
    elif signing_keys is not None:
        raise ValueError("signing_keys are checked against the card's sign-offs: pass card")
    wrong = [
        name
        for name, ok in (
            ("contract hash", contract_hash is None or contract_hash == info.contract_hash),
            ("model spec", model_spec is None or model_spec == info.spec),
        )
        if not ok
    ]
    if wrong:
        raise ReleasedModelError(
            f"the file is not of the given contract: {', '.join(wrong)} differ",
            code="released_model.contract_mismatch",
        )
    return file
