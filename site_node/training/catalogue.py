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

:func:`catalogue_name` tells which entry built a network, so that DP training can pick the
per-sample-gradient mode measured fastest for it (:mod:`site_node.privacy.modes`) from the
module alone: the ClientApp hands training a built network, not its spec.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import Classifier, DenseNet, ResNet, SegResNet, UNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from opacus.validators import ModuleValidator
from torch import nn

from concord_protocol.catalogue import (
    DENSENET121,
    RESNETS,
    SEGRESNET_BLOCKS_DOWN,
    SEGRESNET_BLOCKS_UP,
    CatalogueEntry,
    HyperParameter,
    HyperValue,
    check_divisible_input,
    check_image_input,
    get_entry,
    list_models,
    resolve_hyperparameters,
    unet_channels,
)
from concord_protocol.contract import ModelSpec
from concord_protocol.errors import IncompatibleInputError, InvalidHyperparameterError

__all__ = [
    "BUILDERS",
    "CatalogueEntry",
    "HyperParameter",
    "HyperValue",
    "build_model",
    "catalogue_name",
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


def _build_densenet121(
    hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    spatial_dims = check_image_input("densenet121", input_shape, 32)
    groups = hp["norm_groups"] if hp["norm"] == "group" else 1
    if 32 % groups:  # every width of DenseNet121 is a multiple of 32
        raise InvalidHyperparameterError("norm_groups", f"must divide 32, got {groups}")
    return DenseNet(
        spatial_dims=spatial_dims,
        in_channels=input_shape[0],
        out_channels=num_classes,
        init_features=DENSENET121.init_features,
        growth_rate=DENSENET121.growth_rate,
        block_config=DENSENET121.block_config,
        bn_size=DENSENET121.bn_size,
        act=("relu", {"inplace": False}),
        norm=_norm(hp),
        dropout_prob=hp["dropout"],
    )


class _BasicBlock(ResNetBlock):
    """MONAI's basic block, adding the shortcut out of place: its ``out += residual``
    modifies a hooked module's output, which Opacus' per-sample hooks refuse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


class _Bottleneck(ResNetBottleneck):
    """MONAI's bottleneck block, adding the shortcut out of place (see :class:`_BasicBlock`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


_RESNET_BLOCKS: dict[str, type[ResNetBlock | ResNetBottleneck]] = {
    "basic": _BasicBlock,
    "bottleneck": _Bottleneck,
}


def _resnet_builder(name: str) -> Builder:
    kind, layers = RESNETS[name]

    def build(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        spatial_dims = check_image_input(name, input_shape, 32)
        if hp["norm"] == "group" and 64 % hp["norm_groups"]:
            raise InvalidHyperparameterError(
                "norm_groups", f"must divide 64, got {hp['norm_groups']}"
            )
        model = ResNet(
            block=_RESNET_BLOCKS[kind],
            layers=list(layers),
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=input_shape[0],
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,
            num_classes=num_classes,
            act=("relu", {"inplace": False}),
            norm=_norm(hp),
        )
        # MONAI 1.6's ResNet passes ``norm`` to its stem but builds the stages' blocks and
        # projections with its default BatchNorm; swap those for the chosen norm.
        return _without_batchnorm(model, hp)

    return build


def _without_batchnorm(model: nn.Module, hp: Mapping[str, Any]) -> nn.Module:
    """``model`` with every BatchNorm replaced by the entry's GroupNorm or InstanceNorm (the
    same two affine parameters per channel)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            channels = child.num_features
            replacement: nn.Module
            if hp["norm"] == "instance":
                dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}[type(child)]
                instance = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
                replacement = instance[dims](channels, affine=True)
            else:
                replacement = nn.GroupNorm(hp["norm_groups"], channels)
            setattr(parent, child_name, replacement)
    return model


def _check_groups(hp: Mapping[str, Any], first_width: int) -> None:
    groups = hp["norm_groups"] if hp["norm"] == "group" else 1
    if first_width % groups:  # every width doubles the first
        raise InvalidHyperparameterError(
            "norm_groups", f"must divide the first level's {first_width} channels, got {groups}"
        )


class _UNet(UNet):
    """MONAI's UNet whose top decoder norm, over the ``num_classes`` output channels, uses
    the largest group count that divides them (MONAI would refuse, say, 8 groups over 3
    classes); the parameters are the same two per channel."""

    def _get_up_layer(
        self, in_channels: int, out_channels: int, strides: int, is_top: bool
    ) -> nn.Module:
        norm = self.norm
        if is_top and isinstance(norm, tuple) and norm[0] == "group":
            groups = math.gcd(int(norm[1]["num_groups"]), out_channels)
            self.norm = ("group", {"num_groups": groups})
        try:
            return super()._get_up_layer(in_channels, out_channels, strides, is_top)
        finally:
            self.norm = norm


def _build_unet(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    channels = unet_channels(hp)
    spatial_dims = check_divisible_input("unet", input_shape, 2 ** (len(channels) - 1))
    _check_groups(hp, channels[0])
    return _UNet(
        spatial_dims=spatial_dims,
        in_channels=input_shape[0],
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=hp["res_units"],
        act=("relu", {"inplace": False}),
        norm=_norm(hp),
        dropout=hp["dropout"],
    )


class _ResBlock(ResBlock):
    """SegResNet's residual block, adding the shortcut out of place (MONAI's ``x +=
    identity`` changes a hooked convolution's output, which Opacus' hooks refuse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act(self.norm1(x)))
        out = self.conv2(self.act(self.norm2(out)))
        return out + x


def _build_segresnet(
    hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    factor = 2 ** (len(SEGRESNET_BLOCKS_DOWN) - 1)
    spatial_dims = check_divisible_input("segresnet", input_shape, factor)
    _check_groups(hp, hp["init_filters"])
    model = SegResNet(
        spatial_dims=spatial_dims,
        init_filters=hp["init_filters"],
        in_channels=input_shape[0],
        out_channels=num_classes,
        dropout_prob=hp["dropout"] or None,
        act=("relu", {"inplace": False}),
        norm=_norm(hp),
        blocks_down=SEGRESNET_BLOCKS_DOWN,
        blocks_up=SEGRESNET_BLOCKS_UP,
        upsample_mode="nontrainable",
    )
    for module in model.modules():
        if type(module) is ResBlock:
            module.__class__ = _ResBlock  # same parameters, out-of-place shortcut
    return model


#: The network of every catalogue entry, by (name, version).
BUILDERS: dict[tuple[str, str], Builder] = {
    ("tabular-mlp", "1"): _build_mlp,
    ("image-cnn", "1"): _build_cnn,
    ("image-densenet", "1"): _build_densenet,
    ("densenet121", "1"): _build_densenet121,
    **{(name, "1"): _resnet_builder(name) for name in RESNETS},
    ("unet", "1"): _build_unet,
    ("segresnet", "1"): _build_segresnet,
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
    _BUILT[model] = entry.name
    return model.train()


#: The catalogue name of every network :func:`build_model` built that is still alive (weak
#: keys: the table never keeps a network alive).
_BUILT: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def catalogue_name(model: nn.Module) -> str | None:
    """The name of the catalogue entry that built ``model`` with :func:`build_model`, or
    ``None`` for any other module (one built by hand, or a copy)."""
    return _BUILT.get(model)
