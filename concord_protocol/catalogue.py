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

from concord_protocol.contract import ModelSpec, TaskKind, TaskSpec
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
    "check_divisible_input",
    "check_task",
    "get_entry",
    "list_models",
    "parameter_count",
    "resolve_hyperparameters",
    "unet_channels",
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
    task: TaskKind
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


def check_divisible_input(name: str, input_shape: tuple[int, ...], factor: int) -> int:
    """Spatial dimensions of a channel-first image or volume whose every side is a multiple
    of ``factor`` (an encoder-decoder's skips must meet at the same size), else refused."""
    dims = check_image_input(name, input_shape, factor)
    if any(side % factor for side in input_shape[1:]):
        raise IncompatibleInputError(
            f"{name}: every spatial side must be a multiple of {factor}, got {input_shape[1:]}",
            hint="resize or pad the images, or use fewer levels",
        )
    return dims


def _unet_down(
    in_ch: int, out_ch: int, stride: int, dims: int, units: int, *, norm_out: bool = True
) -> int:
    """A MONAI UNet encoder step: a residual unit of ``units`` convolutions, or one
    convolution, each with its norm (convolutions carry a bias)."""
    if units == 0:
        return _conv(in_ch, out_ch, 3, dims, bias=True) + (_norm(out_ch) if norm_out else 0)
    total = 0
    for unit in range(units):
        total += _conv(in_ch if unit == 0 else out_ch, out_ch, 3, dims, bias=True)
        total += _norm(out_ch)
    if stride != 1 or in_ch != out_ch:  # the residual path's projection
        total += _conv(in_ch, out_ch, 3 if stride != 1 else 1, dims, bias=True)
    return total


def _unet_up(in_ch: int, out_ch: int, dims: int, units: int, *, top: bool) -> int:
    """A MONAI UNet decoder step: a transposed convolution (3x3, bias), normed except at
    the top of a plain UNet, then with residual units one more convolution (no norm at the
    top, where the output is the logits)."""
    total = _conv(in_ch, out_ch, 3, dims, bias=True)
    if not (top and units == 0):
        total += _norm(out_ch)
    if units > 0:
        total += _conv(out_ch, out_ch, 3, dims, bias=True) + (0 if top else _norm(out_ch))
    return total


def unet_channels(hp: Mapping[str, Any]) -> tuple[int, ...]:
    """The channels of each UNet level, top first: ``base_channels`` doubling per level."""
    return tuple(hp["base_channels"] * 2**level for level in range(hp["levels"]))


def _unet_parameters(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> int:
    """MONAI ``UNet`` (stride-2 levels, 3x3 kernels, residual units), as the site builds it."""
    channels = unet_channels(hp)
    dims = check_divisible_input("unet", input_shape, 2 ** (len(channels) - 1))
    _check_groups(hp, channels)
    units = hp["res_units"]

    def block(in_ch: int, out_ch: int, level: int) -> int:
        c = channels[level]
        if level + 2 < len(channels):
            below, up_in = block(c, c, level + 1), 2 * c
        else:  # the bottom: a stride-1 step to the last width
            below, up_in = _unet_down(c, channels[-1], 1, dims, units), c + channels[-1]
        down = _unet_down(in_ch, c, 2, dims, units)
        return down + below + _unet_up(up_in, out_ch, dims, units, top=level == 0)

    return block(input_shape[0], num_classes, 0)


#: SegResNet's fixed depth: residual blocks per encoder and decoder level (Myronenko, 2018).
SEGRESNET_BLOCKS_DOWN = (1, 2, 2, 4)
SEGRESNET_BLOCKS_UP = (1, 1, 1)


def _segresnet_parameters(
    hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> int:
    """MONAI ``SegResNet`` (bias-free 3x3 convolutions, pre-activation residual blocks,
    non-trainable upsampling, a 1x1 head with bias), as the site builds it."""
    dims = check_divisible_input("segresnet", input_shape, 2 ** (len(SEGRESNET_BLOCKS_DOWN) - 1))
    f = hp["init_filters"]
    _check_groups(hp, (f,))

    def res_block(ch: int) -> int:
        return 2 * _norm(ch) + 2 * _conv(ch, ch, 3, dims, bias=False)

    total = _conv(input_shape[0], f, 3, dims, bias=False)
    for level, blocks in enumerate(SEGRESNET_BLOCKS_DOWN):
        ch = f * 2**level
        if level > 0:
            total += _conv(ch // 2, ch, 3, dims, bias=False)
        total += blocks * res_block(ch)
    n_up = len(SEGRESNET_BLOCKS_UP)
    for level, blocks in enumerate(SEGRESNET_BLOCKS_UP):
        ch = f * 2 ** (n_up - level)
        total += blocks * res_block(ch // 2) + _conv(ch, ch // 2, 1, dims, bias=False)
    return total + _norm(f) + _conv(f, num_classes, 1, dims, bias=True)


def _check_groups(hp: Mapping[str, Any], widths: tuple[int, ...]) -> None:
    groups = hp["norm_groups"] if hp["norm"] == "group" else 1
    if any(width % groups for width in widths):
        raise InvalidHyperparameterError(
            "norm_groups",
            f"{groups} does not divide every layer's channel count ({widths[0]} first)",
            hint="use a power of two that divides the first level's channels, or 1",
        )


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
    CatalogueEntry(
        name="unet",
        version="1",
        task="segmentation",
        modality="image",
        description="MONAI UNet (residual units, GroupNorm for DP), 2D or 3D; MONAI's "
        "standard 16-256 channels by default.",
        hyperparameters=(
            HyperParameter("base_channels", "int", 16, "Channels of the top level.", 2, 64),
            HyperParameter("levels", "int", 5, "Levels, each halving the resolution.", 2, 6),
            HyperParameter("res_units", "int", 2, "Residual units per level (0: plain).", 0, 3),
            _NORM,
            _norm_groups(8),
            _DROPOUT,
        ),
        parameter_count=_unet_parameters,
    ),
    CatalogueEntry(
        name="segresnet",
        version="1",
        task="segmentation",
        modality="image",
        description="MONAI SegResNet (Myronenko's encoder-decoder, GroupNorm), 2D or 3D.",
        hyperparameters=(
            HyperParameter("init_filters", "int", 16, "Channels of the first level.", 2, 64),
            _NORM,
            _norm_groups(8),
            _DROPOUT,
        ),
        parameter_count=_segresnet_parameters,
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


def check_task(spec: ModelSpec, task: TaskSpec) -> CatalogueEntry:
    """The entry of ``spec``, refused (:class:`IncompatibleInputError`) unless it is a model
    of the study's task: a classifier cannot be trained on masks, nor a UNet on labels."""
    entry = get_entry(spec.name, spec.version)
    if entry.task != task.kind:
        models = ", ".join(e.name for e in list_models() if e.task == task.kind)
        raise IncompatibleInputError(
            f"{entry.name} v{entry.version} is a {entry.task} model; the study's task is "
            f"{task.kind}",
            hint=f"pick a {task.kind} model: {models}",
        )
    return entry
