"""Model catalogue (DP-readiness, hyperparameter validation) and parameter vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from concord_protocol.contract import ModelSpec, PrivacySpec, TaskSpec, TrainingSpec
from concord_protocol.errors import (
    IncompatibleInputError,
    InvalidHyperparameterError,
    UnknownModelError,
)
from site_node.data import LocalDataset
from site_node.errors import ParameterShapeError
from site_node.privacy import DpTrainer
from site_node.training import (
    build_model,
    flatten,
    list_models,
    manifest_digest,
    num_parameters,
    parameter_manifest,
    train_round,
    unflatten_into,
)

torch.set_num_threads(1)

#: Small inputs: the real-size networks (densenet121, resnet*) downsample 32x.
SHAPES = {"tabular": (6,), "image": (1, 32, 32)}


def _spec(name: str, **hp: int | float | str | bool) -> ModelSpec:
    return ModelSpec(name=name, version="1", hyperparameters=hp)


def _toy(
    shape: tuple[int, ...], n: int = 16, classes: int = 3, *, segmentation: bool = False
) -> LocalDataset:
    gen = torch.Generator().manual_seed(0)
    if segmentation:
        return LocalDataset(
            features=torch.randn(n, *shape, generator=gen),
            labels=torch.randint(0, classes, (n, *shape[1:]), generator=gen),
            num_classes=classes,
            modality="test",
            task="segmentation",
        )
    return LocalDataset(
        features=torch.randn(n, *shape, generator=gen),
        labels=torch.arange(n) % classes,
        num_classes=classes,
        modality="test",
    )


def test_list_models_describes_every_entry() -> None:
    entries = list_models()
    assert {(e.name, e.version) for e in entries} == {
        ("densenet121", "1"),
        ("image-cnn", "1"),
        ("image-densenet", "1"),
        ("resnet18", "1"),
        ("resnet50", "1"),
        ("segresnet", "1"),
        ("tabular-mlp", "1"),
        ("unet", "1"),
    }
    tasks = {"unet": "segmentation", "segresnet": "segmentation"}
    for entry in entries:
        schema = entry.schema()
        assert schema["task"] == tasks.get(entry.name, "classification")
        assert schema["description"]
        for hp in schema["hyperparameters"]:
            assert {"name", "type", "default", "description"} <= set(hp)
            assert "choices" in hp or ("minimum" in hp and "maximum" in hp)


@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_every_entry_is_dp_ready_and_trains_one_dp_step(entry: object) -> None:
    name = entry.name  # type: ignore[attr-defined]
    shape = SHAPES[entry.modality]  # type: ignore[attr-defined]
    model = build_model(_spec(name), input_shape=shape, num_classes=3, seed=1)
    ModuleValidator.validate(model, strict=True)
    assert all(not getattr(m, "inplace", False) for m in model.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    segmentation = entry.task == "segmentation"  # type: ignore[attr-defined]
    data = _toy(shape, segmentation=segmentation)
    task = TaskSpec(kind="segmentation" if segmentation else "classification")
    training = TrainingSpec(rounds=1, batch_size=8, learning_rate=0.1)
    dp = DpTrainer(
        PrivacySpec(epsilon=50.0, delta=1e-3), training, num_samples=16, noise_multiplier=1.0
    )
    before = flatten(model)
    result = train_round(model, data, training, dp=dp, seed=0, task=task)
    assert result.steps == 2  # 1 epoch = ceil(16 / 8) Poisson-sampled steps
    assert dp.steps_taken == 2
    assert result.epsilon_spent is not None
    assert result.epsilon_spent > 0
    assert not np.array_equal(before, flatten(model))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("image-cnn", 8),
        ("image-densenet", 8),
        ("densenet121", 32),
        ("resnet18", 32),
        ("resnet50", 32),
    ],
)
def test_image_models_accept_volumes(name: str, side: int) -> None:
    model = build_model(_spec(name), input_shape=(1, side, side, side), num_classes=2)
    assert model(torch.zeros(2, 1, side, side, side)).shape == (2, 2)


@pytest.mark.parametrize(
    ("name", "shape", "count"),
    [
        # The published sizes, less the 1000-class head plus ours (3 classes, 3 channels).
        ("densenet121", (3, 224, 224), 6_956_931),
        ("resnet18", (3, 224, 224), 11_178_051),
        ("resnet50", (3, 224, 224), 23_514_179),
    ],
)
def test_real_size_networks_have_their_published_size(
    name: str, shape: tuple[int, ...], count: int
) -> None:
    model = build_model(_spec(name), input_shape=shape, num_classes=3)
    assert num_parameters(model) == count
    head = {"densenet121": 1024, "resnet18": 512, "resnet50": 2048}[name]
    published = {"densenet121": 7_978_856, "resnet18": 11_689_512, "resnet50": 25_557_032}[name]
    assert count - (head * 3 + 3) == published - (head * 1000 + 1000)


def test_init_is_deterministic_given_seed() -> None:
    a = build_model(_spec("image-cnn"), input_shape=(1, 16, 16), num_classes=2, seed=5)
    b = build_model(_spec("image-cnn"), input_shape=(1, 16, 16), num_classes=2, seed=5)
    c = build_model(_spec("image-cnn"), input_shape=(1, 16, 16), num_classes=2, seed=6)
    assert np.array_equal(flatten(a), flatten(b))
    assert not np.array_equal(flatten(a), flatten(c))


def test_version_matching_and_unknown_models() -> None:
    build_model(ModelSpec(name="tabular-mlp", version="1.0.0"), input_shape=(3,), num_classes=2)
    with pytest.raises(UnknownModelError, match="version '2'") as info:
        build_model(ModelSpec(name="tabular-mlp", version="2"), input_shape=(3,), num_classes=2)
    assert info.value.code == "model.unknown"
    with pytest.raises(UnknownModelError, match="'vit'"):
        build_model(ModelSpec(name="vit", version="1"), input_shape=(3,), num_classes=2)


@pytest.mark.parametrize(
    ("name", "hp", "offender"),
    [
        ("tabular-mlp", {"width": 4}, "width"),
        ("tabular-mlp", {"hidden": 0}, "hidden"),
        ("tabular-mlp", {"hidden": 2000}, "hidden"),
        ("tabular-mlp", {"hidden": 3.5}, "hidden"),
        ("tabular-mlp", {"layers": True}, "layers"),
        ("tabular-mlp", {"dropout": 0.95}, "dropout"),
        ("tabular-mlp", {"activation": "gelu"}, "activation"),
        ("image-cnn", {"norm": "batch"}, "norm"),
        ("image-cnn", {"base_channels": 6, "norm_groups": 4}, "norm_groups"),
        ("image-densenet", {"init_features": 6, "norm_groups": 4}, "norm_groups"),
        ("image-densenet", {"blocks": 9}, "blocks"),
        ("densenet121", {"norm_groups": 64}, "norm_groups"),
        ("resnet18", {"norm_groups": 48}, "norm_groups"),
        ("resnet50", {"norm": "batch"}, "norm"),
    ],
)
def test_invalid_hyperparameters_are_named(
    name: str, hp: dict[str, int | float | str | bool], offender: str
) -> None:
    shape = (5,) if name == "tabular-mlp" else (1, 32, 32)
    with pytest.raises(InvalidHyperparameterError) as info:
        build_model(_spec(name, **hp), input_shape=shape, num_classes=2)
    assert info.value.name == offender
    assert offender in str(info.value)
    assert info.value.code == "model.invalid_hyperparameter"


def test_incompatible_input_shapes() -> None:
    with pytest.raises(IncompatibleInputError, match="tabular"):
        build_model(_spec("tabular-mlp"), input_shape=(1, 8, 8), num_classes=2)
    with pytest.raises(IncompatibleInputError, match="channel-first"):
        build_model(_spec("image-cnn"), input_shape=(30,), num_classes=2)
    with pytest.raises(IncompatibleInputError, match="too small"):
        build_model(_spec("image-cnn", depth=5), input_shape=(1, 16, 16), num_classes=2)


class TestParams:
    def test_flatten_unflatten_round_trip(self) -> None:
        spec = _spec("image-densenet")
        a = build_model(spec, input_shape=(1, 16, 16), num_classes=2, seed=1)
        b = build_model(spec, input_shape=(1, 16, 16), num_classes=2, seed=2)
        vector = flatten(a)
        assert vector.dtype == np.float64
        assert vector.shape == (num_parameters(a),)
        unflatten_into(b, vector)
        assert np.array_equal(flatten(b), vector)
        x = torch.randn(3, 1, 16, 16)
        a.eval()
        b.eval()
        assert torch.allclose(a(x), b(x))

    def test_unflatten_checks_shape(self) -> None:
        model = build_model(_spec("tabular-mlp"), input_shape=(4,), num_classes=2)
        n = num_parameters(model)
        with pytest.raises(ParameterShapeError, match=f"has {n - 1} values, the model has {n}"):
            unflatten_into(model, np.zeros(n - 1))
        with pytest.raises(ParameterShapeError, match="1-D"):
            unflatten_into(model, np.zeros((1, n)))
        bad = np.zeros(n)
        bad[3] = np.nan
        with pytest.raises(ParameterShapeError, match="non-finite"):
            unflatten_into(model, bad)

    def test_manifest_and_digest(self) -> None:
        model = build_model(
            _spec("tabular-mlp", hidden=8, layers=1), input_shape=(4,), num_classes=2
        )
        assert parameter_manifest(model) == [
            ("0.weight", (8, 4)),
            ("0.bias", (8,)),
            ("2.weight", (2, 8)),
            ("2.bias", (2,)),
        ]
        same = build_model(
            _spec("tabular-mlp", hidden=8, layers=1), input_shape=(4,), num_classes=2, seed=9
        )
        other = build_model(
            _spec("tabular-mlp", hidden=9, layers=1), input_shape=(4,), num_classes=2
        )
        assert manifest_digest(model) == manifest_digest(same)
        assert manifest_digest(model) == manifest_digest(parameter_manifest(model))
        assert manifest_digest(model) != manifest_digest(other)
        assert len(manifest_digest(model)) == 64


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_resnet_blocks_compute_what_monais_do(kind: str) -> None:
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
    from torch import nn

    from site_node.training.catalogue import _RESNET_BLOCKS

    stock_type = ResNetBlock if kind == "basic" else ResNetBottleneck
    out = 16 * stock_type.expansion
    downsample = nn.Sequential(nn.Conv2d(8, out, 1, stride=2, bias=False), nn.GroupNorm(4, out))
    norm = ("group", {"num_groups": 4})
    stock = stock_type(8, 16, spatial_dims=2, stride=2, downsample=downsample, norm=norm)
    ours = _RESNET_BLOCKS[kind](8, 16, spatial_dims=2, stride=2, downsample=downsample, norm=norm)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 8, 16, 16)
    assert torch.allclose(ours(x), stock(x))
