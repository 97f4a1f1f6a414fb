"""Where a site trains (CONCORD_SITE_DEVICE): auto picks CUDA only when PyTorch sees it, a
named device that is not there is refused with a stable code, and training and scoring
leave the model on the CPU whatever device they ran on."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from concord_protocol.contract import ModelSpec, TrainingSpec
from site_node.data.dataset import LocalDataset
from site_node.errors import TrainingDeviceError
from site_node.settings import SiteSettings
from site_node.training import build_model, evaluate, train_round
from site_node.training.device import resolve_device


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_named_gpu_that_is_not_there_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingDeviceError, match="no CUDA device") as caught:
        resolve_device("cuda")
    assert caught.value.code == "training.device_unavailable"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(TrainingDeviceError, match="1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "tpu", "", "CPU"])
def test_the_setting_accepts_only_known_devices(value: str) -> None:
    with pytest.raises(ValueError, match="device"):
        SiteSettings(site_id="hospital-a", device=value)
    with pytest.raises(TrainingDeviceError):
        resolve_device(value)


def test_training_and_scoring_on_a_device_leave_the_model_on_the_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    data = LocalDataset(
        features=torch.randn(32, 6, generator=gen),
        labels=torch.arange(32) % 2,
        num_classes=2,
        modality="test",
    )
    model = build_model(ModelSpec(name="tabular-mlp", version="1"), input_shape=(6,), num_classes=2)
    moved: list[torch.device] = []
    original_to = torch.nn.Module.to

    def spy(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if self is model:
            moved.append(torch.device(args[0]))
        return original_to(self, *args, **kwargs)

    training = TrainingSpec(rounds=1, batch_size=8, learning_rate=0.1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "to", spy)
        result = train_round(model, data, training, dp=None, seed=0, device="cpu")
        metrics = evaluate(model, data, device=torch.device("cpu"))
    assert result.steps == 4
    assert metrics.num_samples == 32
    assert moved == [torch.device("cpu")] * 4  # to the device and back, for each call
    assert all(p.device.type == "cpu" for p in model.parameters())
