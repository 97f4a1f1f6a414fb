"""The model catalogue's data: named, versioned architectures a study can ask for.

A study names a model (``ModelSpec``: name, version, hyperparameters); no researcher code
runs at a hospital, so only entries listed here exist. This module holds what the server
and every site must agree on, without torch: each entry's task, modality, accepted
hyperparameters (type, range or choices, default) and how many parameters it has for a
given input. The site builds the networks (:mod:`site_node.training.catalogue`, MONAI and
PyTorch); the server checks contracts against this data and sizes a study's encrypted
updates from :func:`parameter_count` without building a model. A site test builds every
entry over many hyperparameters and input shapes and checks that the count here is the
network's.

Versions compare numerically: ``"1"``, ``"1.0"`` and ``"1.0.0"`` name the same entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from concord_protocol.contract import ModelSpec
from concord_protocol.errors import (
    IncompatibleInputError,
    InvalidHyperparameterError,
    UnknownModelError,
)

__all__ = [
    "CatalogueEntry",
    "HyperParameter",
    "HyperValue",
    "catalogue_keys",
    "get_entry",
    "list_models",
    "parameter_count",
    "resolve_hyperparameters",
]

HyperValue = int | float | str | bool
#: (resolved hyperparameters, input shape of one record, number of classes) -> parameters.
ParameterCount = Callable[[Mapping[str, Any], tuple[int, ...], int], int]


@dataclass(frozen=True)
class HyperParameter:
    """One accepted hyperparameter: type, default, and an inclusive range or a set of choices."""

    name: str
    type: Literal["int", "float", "str", "bool"]
    default: HyperValue
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    def validate(self, value: object) -> HyperValue:
        """Return ``value`` converted to this parameter's type, or raise naming the parameter."""
        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidHyperparameterError(self.name, f"must be an integer, got {value!r}")
            out: HyperValue = value
        elif self.type == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidHyperparameterError(self.name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidHyperparameterError(self.name, "must be finite")
            out = float(value)
        elif self.type == "bool":
            if not isinstance(value, bool):
                raise InvalidHyperparameterError(self.name, f"must be true/false, got {value!r}")
            out = value
        else:
            if not isinstance(value, str):
                raise InvalidHyperparameterError(self.name, f"must be a string, got {value!r}")
            out = value
        if self.choices is not None and out not in self.choices:
            raise InvalidHyperparameterError(
                self.name, f"must be one of {list(self.choices)}, got {out!r}"
            )
        if isinstance(out, int | float) and not isinstance(out, bool):
            if self.minimum is not None and out < self.minimum:
                raise InvalidHyperparameterError(
                    self.name, f"must be >= {self.minimum:g}, got {out!r}"
                )
            if self.maximum is not None and out > self.maximum:
                raise InvalidHyperparameterError(
                    self.name, f"must be <= {self.maximum:g}, got {out!r}"
                )
        return out

    def schema(self) -> dict[str, Any]:
        """JSON-able description (for the CLI table and the API)."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "description": self.description,
        }
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True)
class CatalogueEntry:
    """A named, versioned architecture (its data; the network is built at the site)."""

    name: str
    version: str
    task: str
    modality: Literal["tabular", "image"]
    description: str
    hyperparameters: tuple[HyperParameter, ...]
    parameter_count: ParameterCount = field(repr=False, compare=False)

    def schema(self) -> dict[str, Any]:
        """JSON-able description of the entry."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "modality": self.modality,
            "description": self.description,
            "hyperparameters": [h.schema() for h in self.hyperparameters],
        }


# --- parameter counts (the networks the site builds; tested against them) ------------------


def check_image_input(name: str, input_shape: tuple[int, ...], min_side: int) -> int:
    """Spatial dimensions of a channel-first image or volume, refused if too small."""
    if len(input_shape) not in (3, 4):
        raise IncompatibleInputError(
            f"{name} needs channel-first images (C, H, W) or volumes (C, D, H, W), "
            f"got shape {input_shape}",
        )
    if min(input_shape[1:]) < min_side:
        raise IncompatibleInputError(
            f"{name}: spatial size {input_shape[1:]} is too small for this depth "
            f"(needs >= {min_side})",
            hint="use larger images or fewer levels/blocks",
        )
    return len(input_shape) - 1


def _conv(in_ch: int, out_ch: int, kernel: int, dims: int, *, bias: bool) -> int:
    return in_ch * out_ch * kernel**dims + (out_ch if bias else 0)


def _norm(channels: int) -> int:
    # GroupNorm and InstanceNorm(affine=True): a weight and a bias per channel.
    return 2 * channels


def _mlp_parameters(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> int:
    if len(input_shape) != 1:
        raise IncompatibleInputError(
            f"tabular-mlp needs tabular input (n_features,), got shape {input_shape}",
        )
    width, total = input_shape[0], 0
    for _ in range(hp["layers"]):
        total += width * hp["hidden"] + hp["hidden"]
        width = hp["hidden"]
    return total + width * num_classes + num_classes


def _cnn_parameters(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> int:
    """MONAI ``Classifier`` with stride-2 levels of 3x3 convolutions (residual or plain)."""
    depth = hp["depth"]
    dims = check_image_input("image-cnn", input_shape, 2**depth)
    base, units = hp["base_channels"], hp["res_units"]
    if hp["norm"] == "group" and base % hp["norm_groups"]:
        raise InvalidHyperparameterError(
            "norm_groups", f"must divide base_channels ({base}), got {hp['norm_groups']}"
        )
    in_ch, total = input_shape[0], 0
    sizes = list(input_shape[1:])
    for level in range(depth):
        out_ch = base * 2**level
        last = level == depth - 1
        if units > 0:
            for unit in range(units):
                total += _conv(in_ch if unit == 0 else out_ch, out_ch, 3, dims, bias=True)
                if not (last and unit == units - 1):
                    total += _norm(out_ch)
            total += _conv(in_ch, out_ch, 3, dims, bias=True)  # strided residual path
        else:
            total += _conv(in_ch, out_ch, 3, dims, bias=True)
            if not last:
                total += _norm(out_ch)
        sizes = [(s - 1) // 2 + 1 for s in sizes]  # kernel 3, stride 2, padding 1
        in_ch = out_ch
    flat = in_ch * math.prod(sizes)
    return total + flat * num_classes + num_classes


def _densenet_parameters(
    hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> int:
    """MONAI ``DenseNet``: 7x7 stem, dense blocks of 1x1 + 3x3 layers, 1x1 transitions."""
    widths = DenseNetWidths(
        init_features=hp["init_features"],
        growth_rate=hp["growth_rate"],
        bn_size=hp["bn_size"],
        block_config=(hp["layers_per_block"],) * hp["blocks"],
    )
    return _dense_blocks_parameters("image-densenet", hp, input_shape, num_classes, widths)


def _dense_blocks_parameters(
    name: str,
    hp: Mapping[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    net: DenseNetWidths,
) -> int:
    layers = net.block_config
    dims = check_image_input(name, input_shape, 2 ** (len(layers) + 1))
    growth, bottleneck = net.growth_rate, net.bn_size * net.growth_rate
    channels = net.init_features
    groups = hp["norm_groups"] if hp["norm"] == "group" else 1
    widths = [channels, bottleneck]
    total = _conv(input_shape[0], channels, 7, dims, bias=False) + _norm(channels)
    for block, count in enumerate(layers):
        for _ in range(count):
            total += _norm(channels) + _conv(channels, bottleneck, 1, dims, bias=False)
            total += _norm(bottleneck) + _conv(bottleneck, growth, 3, dims, bias=False)
            channels += growth
            widths.append(channels)
        if block == len(layers) - 1:
            total += _norm(channels)
        else:
            total += _norm(channels) + _conv(channels, channels // 2, 1, dims, bias=False)
            channels //= 2
            widths.append(channels)
    if any(width % groups for width in widths):
        raise InvalidHyperparameterError(
            "norm_groups",
            f"{hp['norm_groups']} does not divide every layer's channel count",
            hint="use a power of two that divides init_features and growth_rate, or 1",
        )
    return total + channels * num_classes + num_classes


@dataclass(frozen=True)
class DenseNetWidths:
    """The fixed widths of a named DenseNet."""

    init_features: int
    growth_rate: int
    bn_size: int
    block_config: tuple[int, ...]


#: MONAI ``DenseNet121``: its stem, growth, bottleneck and blocks (Huang et al., 2017).
DENSENET121 = DenseNetWidths(
    init_features=64, growth_rate=32, bn_size=4, block_config=(6, 12, 24, 16)
)


def _densenet121_parameters(
    hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> int:
    """DenseNet121: :func:`_dense_blocks_parameters` at its fixed widths."""
    return _dense_blocks_parameters("densenet121", hp, input_shape, num_classes, DENSENET121)


#: MONAI ``ResNet`` depths: (block kind, blocks per stage), stages of 64-512 channels.
RESNETS: dict[str, tuple[Literal["basic", "bottleneck"], tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_RESNET_WIDTHS = (64, 128, 256, 512)


def _resnet_parameters(
    name: str, hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> int:
    """MONAI ``ResNet`` (7x7 stride-2 stem, max pool, four stages, shortcut type B without
    bias, GroupNorm), as :func:`site_node.training.catalogue` builds it."""
    dims = check_image_input(name, input_shape, 32)
    kind, layers = RESNETS[name]
    expansion = 1 if kind == "basic" else 4
    groups = hp["norm_groups"] if hp["norm"] == "group" else 1
    if any(w % groups for w in _RESNET_WIDTHS):
        raise InvalidHyperparameterError(
            "norm_groups", f"must divide 64, got {hp['norm_groups']}", hint="use 1 to 64"
        )
    total = _conv(input_shape[0], 64, 7, dims, bias=False) + _norm(64)
    in_planes = 64
    for stage, (planes, blocks) in enumerate(zip(_RESNET_WIDTHS, layers, strict=True)):
        out = planes * expansion
        if stage > 0 or in_planes != out:  # stride 2, or more channels: a 1x1 projection
            total += _conv(in_planes, out, 1, dims, bias=False) + _norm(out)
        for block in range(blocks):
            source = in_planes if block == 0 else out
            if kind == "basic":
                total += _conv(source, planes, 3, dims, bias=False) + _norm(planes)
                total += _conv(planes, planes, 3, dims, bias=False) + _norm(planes)
            else:
                total += _conv(source, planes, 1, dims, bias=False) + _norm(planes)
                total += _conv(planes, planes, 3, dims, bias=False) + _norm(planes)
                total += _conv(planes, out, 1, dims, bias=False) + _norm(out)
        in_planes = out
    return total + in_planes * num_classes + num_classes


_DROPOUT = HyperParameter("dropout", "float", 0.0, "Dropout probability.", 0.0, 0.9)
_NORM = HyperParameter(
    "norm", "str", "group", "Normalisation (DP-compatible only).", choices=("group", "instance")
)
_NORM_GROUPS = HyperParameter("norm_groups", "int", 4, "Groups of GroupNorm.", 1, 32)


def _norm_groups(default: int) -> HyperParameter:
    return HyperParameter("norm_groups", "int", default, "Groups of GroupNorm.", 1, 64)


_ENTRIES: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        name="tabular-mlp",
        version="1",
        task="classification",
        modality="tabular",
        description="Multilayer perceptron for standardised tabular features.",
        hyperparameters=(
            HyperParameter("hidden", "int", 64, "Units per hidden layer.", 2, 1024),
            HyperParameter("layers", "int", 2, "Hidden layers.", 1, 8),
            _DROPOUT,
            HyperParameter(
                "activation",
                "str",
                "tanh",
                "Hidden activation (tanh is the DP-friendlier default).",
                choices=("tanh", "relu"),
            ),
        ),
        parameter_count=_mlp_parameters,
    ),
    CatalogueEntry(
        name="image-cnn",
        version="1",
        task="classification",
        modality="image",
        description="Small strided CNN (MONAI Classifier, residual units, GroupNorm), 2D or 3D.",
        hyperparameters=(
            HyperParameter("base_channels", "int", 8, "Channels of the first level.", 2, 64),
            HyperParameter("depth", "int", 3, "Levels, each halving the resolution.", 1, 5),
            HyperParameter("res_units", "int", 1, "Residual units per level (0: plain).", 0, 3),
            _NORM,
            _NORM_GROUPS,
            _DROPOUT,
        ),
        parameter_count=_cnn_parameters,
    ),
    CatalogueEntry(
        name="image-densenet",
        version="1",
        task="classification",
        modality="image",
        description="Small DenseNet (MONAI DenseNet, GroupNorm), 2D or 3D.",
        hyperparameters=(
            HyperParameter("init_features", "int", 16, "Channels after the stem.", 4, 64),
            HyperParameter("growth_rate", "int", 8, "Channels added per dense layer.", 4, 32),
            HyperParameter("blocks", "int", 2, "Dense blocks.", 1, 4),
            HyperParameter("layers_per_block", "int", 2, "Dense layers per block.", 1, 8),
            HyperParameter("bn_size", "int", 2, "Bottleneck width multiplier.", 1, 4),
            _NORM,
            _NORM_GROUPS,
            _DROPOUT,
        ),
        parameter_count=_densenet_parameters,
    ),
    CatalogueEntry(
        name="densenet121",
        version="1",
        task="classification",
        modality="image",
        description="MONAI DenseNet121 at its real size (GroupNorm for DP), 2D or 3D.",
        hyperparameters=(_NORM, _norm_groups(32), _DROPOUT),
        parameter_count=_densenet121_parameters,
    ),
    *(
        CatalogueEntry(
            name=name,
            version="1",
            task="classification",
            modality="image",
            description=f"MONAI ResNet-{name[6:]} at its real size (GroupNorm for DP), 2D or 3D.",
            hyperparameters=(_NORM, _norm_groups(32)),
            parameter_count=partial(_resnet_parameters, name),
        )
        for name in RESNETS
    ),
)


def _version_key(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def list_models() -> list[CatalogueEntry]:
    """Every catalogue entry, sorted by name then version."""
    return sorted(_ENTRIES, key=lambda e: (e.name, _version_key(e.version)))


def get_entry(name: str, version: str) -> CatalogueEntry:
    """The entry for ``name`` and ``version``, or :class:`UnknownModelError`."""
    try:
        key = _version_key(version)
    except ValueError:
        key = ()
    for entry in _ENTRIES:
        if entry.name == name and _version_key(entry.version) == key:
            return entry
    known = ", ".join(f"{e.name} v{e.version}" for e in list_models())
    raise UnknownModelError(
        f"no catalogue model {name!r} version {version!r}; available: {known}",
        hint="pick a model listed by `site-node models`",
    )


def resolve_hyperparameters(
    entry: CatalogueEntry, given: Mapping[str, object]
) -> dict[str, HyperValue]:
    """Defaults overlaid with ``given``, each validated; unknown names are refused."""
    schema = {h.name: h for h in entry.hyperparameters}
    for name in given:
        if name not in schema:
            raise InvalidHyperparameterError(
                name,
                f"not accepted by {entry.name} v{entry.version}; accepted: {sorted(schema)}",
            )
    return {
        name: (h.validate(given[name]) if name in given else h.default)
        for name, h in schema.items()
    }


def catalogue_keys() -> frozenset[tuple[str, str]]:
    """(name, version) of every entry, as the data-use policy sees the catalogue."""
    return frozenset((entry.name, entry.version) for entry in _ENTRIES)


def parameter_count(spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int) -> int:
    """Number of parameters of the catalogue model ``spec`` for records of ``input_shape``.

    The same number every site's network has (so the server can size and check encrypted
    updates without torch). Raises :class:`UnknownModelError`,
    :class:`InvalidHyperparameterError` or :class:`IncompatibleInputError` exactly where
    the site's builder would.
    """
    entry = get_entry(spec.name, spec.version)
    hp = resolve_hyperparameters(entry, spec.hyperparameters)
    if num_classes < 2:
        raise IncompatibleInputError(f"num_classes must be >= 2, got {num_classes}")
    return entry.parameter_count(hp, tuple(int(d) for d in input_shape), num_classes)
