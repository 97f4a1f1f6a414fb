"""The site builds the catalogue's networks: MONAI and PyTorch, DP-ready.

The catalogue's data (names, versions, accepted hyperparameters, parameter counts) is
shared with the server (:mod:`concord_protocol.catalogue`); here is what only a site does,
build the network. Every builder:

* uses GroupNorm/InstanceNorm, never BatchNorm, and has every ``inplace`` flag turned off
  (MONAI's in-place activations break Opacus' backward hooks);
* passes ``opacus.validators.ModuleValidator.validate(model, strict=True)`` (checked on every
  build);
* is initialised deterministically from ``seed`` (every site builds the same round-1 model);
* has exactly :func:`concord_protocol.catalogue.parameter_count` parameters (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.networks.nets import Classifier, DenseNet
from opacus.validators import ModuleValidator
from torch import nn

from concord_protocol.catalogue import (
    CatalogueEntry,
    HyperParameter,
    HyperValue,
    check_image_input,
    get_entry,
    list_models,
    resolve_hyperparameters,
)
from concord_protocol.contract import ModelSpec
from concord_protocol.errors import IncompatibleInputError, InvalidHyperparameterError

__all__ = [
    "BUILDERS",
    "CatalogueEntry",
    "HyperParameter",
    "HyperValue",
    "build_model",
    "get_entry",
    "list_models",
    "resolve_hyperparameters",
]

Builder = Callable[[Mapping[str, Any], tuple[int, ...], int], nn.Module]


# --- builders -------------------------------------------------------------------------------


def _build_mlp(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 1:
        raise IncompatibleInputError(
            f"tabular-mlp needs tabular input (n_features,), got shape {input_shape}",
        )
    act: type[nn.Module] = nn.Tanh if hp["activation"] == "tanh" else nn.ReLU
    layers: list[nn.Module] = []
    width = input_shape[0]
    for _ in range(hp["layers"]):
        layers += [nn.Linear(width, hp["hidden"]), act()]
        if hp["dropout"] > 0:
            layers.append(nn.Dropout(hp["dropout"]))
        width = hp["hidden"]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _norm(hp: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if hp["norm"] == "instance":
        return ("instance", {"affine": True})
    return ("group", {"num_groups": hp["norm_groups"]})


def _build_cnn(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    depth = hp["depth"]
    check_image_input("image-cnn", input_shape, 2**depth)
    base = hp["base_channels"]
    if hp["norm"] == "group" and base % hp["norm_groups"]:
        raise InvalidHyperparameterError(
            "norm_groups", f"must divide base_channels ({base}), got {hp['norm_groups']}"
        )
    return Classifier(
        in_shape=input_shape,
        classes=num_classes,
        channels=tuple(base * 2**i for i in range(depth)),
        strides=(2,) * depth,
        num_res_units=hp["res_units"],
        act=("relu", {"inplace": False}),
        norm=_norm(hp),
        dropout=hp["dropout"] or None,
    )


def _build_densenet(
    hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    blocks = hp["blocks"]
    spatial_dims = check_image_input("image-densenet", input_shape, 2 ** (blocks + 1))
    try:
        return DenseNet(
            spatial_dims=spatial_dims,
            in_channels=input_shape[0],
            out_channels=num_classes,
            init_features=hp["init_features"],
            growth_rate=hp["growth_rate"],
            block_config=(hp["layers_per_block"],) * blocks,
            bn_size=hp["bn_size"],
            act=("relu", {"inplace": False}),
            norm=_norm(hp),
            dropout_prob=hp["dropout"],
        )
    except ValueError as exc:  # GroupNorm: num_channels not divisible by num_groups
        if "divisible" not in str(exc):
            raise
        raise InvalidHyperparameterError(
            "norm_groups",
            f"{hp['norm_groups']} does not divide every layer's channel count",
            hint="use a power of two that divides init_features and growth_rate, or 1",
        ) from exc


#: The network of every catalogue entry, by (name, version).
BUILDERS: dict[tuple[str, str], Builder] = {
    ("tabular-mlp", "1"): _build_mlp,
    ("image-cnn", "1"): _build_cnn,
    ("image-densenet", "1"): _build_densenet,
}


def build_model(
    spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> nn.Module:
    """Build the catalogue model ``spec`` for inputs of ``input_shape`` (one record).

    The same ``spec``, shapes and ``seed`` give bit-identical initial weights in every
    process. The model is returned in training mode, with every ``inplace`` flag off, and has
    passed Opacus' strict validation.

    Raises:
        UnknownModelError: no entry has this name and version.
        InvalidHyperparameterError: a hyperparameter is unknown, mistyped or out of range.
        IncompatibleInputError: the input shape does not suit the model.
    """
    entry = get_entry(spec.name, spec.version)
    hp = resolve_hyperparameters(entry, spec.hyperparameters)
    if num_classes < 2:
        raise IncompatibleInputError(f"num_classes must be >= 2, got {num_classes}")
    shape = tuple(int(d) for d in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BUILDERS[(entry.name, entry.version)](hp, shape, num_classes)
    for module in model.modules():
        if hasattr(module, "inplace"):
            setattr(module, "inplace", False)  # noqa: B010 (typed as Tensor | Module)
    ModuleValidator.validate(model, strict=True)  # raises if not DP-compatible
    return model.train()
