"""A released model as a researcher uses it: one call from the downloaded file to a network.

::

    from concord_protocol.audit.trusted_keys import load_site_keys
    from site_node.training.released import load_released_model

    model = load_released_model(
        "model.safetensors",
        card="model.card.json",
        contract=contract,  # the StudyContract you submitted
        signing_keys=load_site_keys(Path("site-keys.json")),  # from a hospital, out of band
    )
    scores = model(batch)  # eval mode, the study's catalogue network with its final weights

The file is the server's (``GET /api/v1/studies/{id}/release/model.safetensors``), and the
server is not trusted (docs/threat-model.md). Before any weight is loaded,
:func:`load_released_model` checks, in this order:

1. the format, strictly (:func:`concord_protocol.model_file.read_released_file`: header
   length, JSON, ``F64`` only, contiguous offsets, the metadata);
2. that the data section hashes to the model hash the metadata names, and, when given, that
   the card (model hash, spec, contract hash, study, sign-offs), the contract you submitted
   and the sites' signatures under the keys you pinned agree
   (:func:`concord_protocol.model_file.check_released_file`); with ``signing_keys`` the model
   is the one every site signed, whatever the server says;
3. that the catalogue network the metadata names has exactly as many parameters as the file
   holds, computed without building it (so a claimed input shape cannot make the reader
   allocate a huge network);
4. that the file's tensors are exactly that network's: the same names, shapes and dtype at
   the offsets its flat parameter vector puts them (:mod:`site_node.training.params`). A
   server could otherwise swap two tensors of the same shape, or rename them: the data
   would still hash to the signed value and load into the wrong layers.

Each refusal is a :class:`~concord_protocol.errors.ReleasedModelError` with a stable code.
The weights are then copied from the data section in vector order, which step 4 showed to
be the file's own order.

:func:`build_layout` is the uploading site's side: the layout it sends with the model
bytes, from the same network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from concord_protocol.catalogue import parameter_count
from concord_protocol.contract import ModelSpec, StudyContract
from concord_protocol.errors import CatalogueError, ReleasedModelError
from concord_protocol.model_file import ReleasedFile, check_released_file, expected_tensors
from concord_protocol.release import ModelLayout, ModelParameter
from site_node.errors import ParameterShapeError
from site_node.training.catalogue import build_model
from site_node.training.params import parameter_manifest, unflatten_into

__all__ = ["build_layout", "layout_of", "load_released_model"]

Source = bytes | str | os.PathLike[str]


def layout_of(model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int) -> ModelLayout:
    """The parameter layout of a built catalogue network (vector order)."""
    return ModelLayout(
        input_shape=input_shape,
        num_classes=num_classes,
        parameters=tuple(
            ModelParameter(name=name, shape=shape) for name, shape in parameter_manifest(model)
        ),
    )


def _sized_network(
    spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int, num_params: int
) -> nn.Module | None:
    """The network, built only if the catalogue gives it ``num_params`` parameters (else
    ``None``; an unknown model or unsuitable input raises :class:`CatalogueError`)."""
    if parameter_count(spec, input_shape=input_shape, num_classes=num_classes) != num_params:
        return None
    return build_model(spec, input_shape=input_shape, num_classes=num_classes)


def build_layout(
    spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int, num_params: int
) -> ModelLayout | None:
    """The layout of ``spec``'s network for ``input_shape`` and ``num_classes``, provided it
    has ``num_params`` parameters (the decrypted model's); ``None`` otherwise.

    The count is checked before the network is built: the shape comes from the server.
    """
    try:
        model = _sized_network(spec, input_shape, num_classes, num_params)
    except CatalogueError:
        return None
    if model is None:
        return None
    return layout_of(model, input_shape=input_shape, num_classes=num_classes)


def _read(source: Source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return Path(source).read_bytes()


def _card(card: Mapping[str, Any] | str | os.PathLike[str] | None) -> Mapping[str, Any] | None:
    if card is None or isinstance(card, Mapping):
        return card
    try:
        loaded = json.loads(Path(card).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ReleasedModelError(
            f"{card} is not a model card (JSON)", code="released_model.card_mismatch"
        ) from None
    if not isinstance(loaded, dict):
        raise ReleasedModelError(
            f"{card} is not a model card (JSON)", code="released_model.card_mismatch"
        )
    return loaded


def _layout_mismatch(message: str) -> ReleasedModelError:
    return ReleasedModelError(message, code="released_model.layout_mismatch")


def _network_for(file: ReleasedFile) -> nn.Module:
    """The catalogue network the file names, checked against the file's tensors."""
    info = file.info
    try:
        model = _sized_network(info.spec, info.input_shape, info.num_classes, file.num_params)
    except CatalogueError as exc:
        raise _layout_mismatch(
            f"the file names a network the catalogue cannot build: {exc}"
        ) from None
    if model is None:
        raise _layout_mismatch(
            f"{info.spec.name} v{info.spec.version} for input {list(info.input_shape)} and "
            f"{info.num_classes} classes does not have the {file.num_params} parameters "
            "the file holds"
        )
    expected = expected_tensors(parameter_manifest(model))
    if file.tensors != expected:
        names = {t.name for t in expected}
        found = {t.name for t in file.tensors}
        if names != found:
            detail = (
                f"names differ (missing {sorted(names - found)[:3]}, "
                f"unexpected {sorted(found - names)[:3]})"
            )
        else:
            first = next(
                f for f, e in zip(file.tensors, expected, strict=True) if f != e
            )  # same length: the names are the same set
            detail = f"{first.name!r} is not where, or not the shape, the network has it"
        raise _layout_mismatch(
            f"the file's tensors are not those of {info.spec.name} v{info.spec.version}: {detail}"
        )
    return model


def load_released_model(
    source: Source,
    *,
    card: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    contract: StudyContract | None = None,
    signing_keys: Mapping[str, str | Sequence[str]] | None = None,
) -> nn.Module:
    """The released catalogue network with its final weights, in eval mode, on the CPU.

    ``source``: the safetensors file (path or bytes). ``card``: the model card (the JSON
    of ``GET .../release/card``, or a path to it). ``contract``: the study contract you
    submitted (checked: its hash and model spec). ``signing_keys``: site id -> Ed25519
    public key (base64), or list of keys, for every site of the study, as you got them out
    of band (a ``site-node peers export-keys`` file read with
    :func:`concord_protocol.audit.trusted_keys.load_site_keys`); needs ``card``.

    Raises :class:`~concord_protocol.errors.ReleasedModelError` (see the module for the
    checks and their codes) and ``OSError`` for a file that cannot be read.
    """
    file = check_released_file(
        _read(source),
        card=_card(card),
        contract_hash=contract.contract_hash() if contract is not None else None,
        model_spec=contract.model if contract is not None else None,
        signing_keys=signing_keys,
    )
    model = _network_for(file)
    try:
        unflatten_into(model, np.frombuffer(file.data, dtype="<f8").copy())
    except ParameterShapeError:
        raise ReleasedModelError(
            "the file's parameters are not all finite numbers", code="released_model.malformed"
        ) from None
    return model.eval()
