"""The model catalogue: named, versioned, DP-ready architectures a study can ask for.

A study names a model (``ModelSpec``: name, version, hyperparameters); no researcher code runs
at a hospital, so only entries listed here can be built. Every entry:

* validates its hyperparameters against a schema (type, range or choices) and refuses unknown
  ones, naming the offender (:class:`InvalidHyperparameterError`);
* uses GroupNorm/InstanceNorm, never BatchNorm, and has every ``inplace`` flag turned off
  (MONAI's in-place activations break Opacus' backward hooks);
* passes ``opacus.validators.ModuleValidator.validate(model, strict=True)`` (checked on every
  build);
* is initialised deterministically from ``seed`` (the server sends initial weights anyway).

Versions compare numerically: ``"1"``, ``"1.0"`` and ``"1.0.0"`` name the same entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from monai.networks.nets import Classifier, DenseNet
from opacus.validators import ModuleValidator
from torch import nn

from consortium_server.studies.contract import ModelSpec
from site_node.errors import IncompatibleInputError, InvalidHyperparameterError, UnknownModelError

__all__ = [
    "CatalogueEntry",
    "HyperParameter",
    "HyperValue",
    "build_model",
    "get_entry",
    "list_models",
    "resolve_hyperparameters",
]

HyperValue = int | float | str | bool
Builder = Callable[[Mapping[str, Any], tuple[int, ...], int], nn.Module]


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
    """A named, versioned architecture."""

    name: str
    version: str
    task: str
    modality: Literal["tabular", "image"]
    description: str
    hyperparameters: tuple[HyperParameter, ...]
    builder: Builder = field(repr=False, compare=False)

    def schema(self) -> dict[str, Any]:
        """JSON-able description of the entry (no builder)."""
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "modality": self.modality,
            "description": self.description,
            "hyperparameters": [h.schema() for h in self.hyperparameters],
        }


# --- builders -------------------------------------------------------------------------------


def _build_mlp(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 1:
        raise IncompatibleInputError(
            f"tabular-mlp needs tabular input (n_features,), got shape {input_shape}"
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


def _image_dims(name: str, input_shape: tuple[int, ...], min_side: int) -> int:
    if len(input_shape) not in (3, 4):
        raise IncompatibleInputError(
            f"{name} needs channel-first images (C, H, W) or volumes (C, D, H, W), "
            f"got shape {input_shape}"
        )
    if min(input_shape[1:]) < min_side:
        raise IncompatibleInputError(
            f"{name}: spatial size {input_shape[1:]} is too small for this depth "
            f"(needs >= {min_side})",
            hint="use larger images or fewer levels/blocks",
        )
    return len(input_shape) - 1


def _norm(hp: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if hp["norm"] == "instance":
        return ("instance", {"affine": True})
    return ("group", {"num_groups": hp["norm_groups"]})


def _build_cnn(hp: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    depth = hp["depth"]
    _image_dims("image-cnn", input_shape, 2**depth)
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
    spatial_dims = _image_dims("image-densenet", input_shape, 2 ** (blocks + 1))
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


_DROPOUT = HyperParameter("dropout", "float", 0.0, "Dropout probability.", 0.0, 0.9)
_NORM = HyperParameter(
    "norm", "str", "group", "Normalisation (DP-compatible only).", choices=("group", "instance")
)
_NORM_GROUPS = HyperParameter("norm_groups", "int", 4, "Groups of GroupNorm.", 1, 32)

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
        builder=_build_mlp,
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
        builder=_build_cnn,
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
        builder=_build_densenet,
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
        model = entry.builder(hp, shape, num_classes)
    for module in model.modules():
        if hasattr(module, "inplace"):
            setattr(module, "inplace", False)  # noqa: B010 (typed as Tensor | Module)
    ModuleValidator.validate(model, strict=True)  # raises if not DP-compatible
    return model.train()
