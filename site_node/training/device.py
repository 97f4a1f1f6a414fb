"""Where a site trains: the GPU when one is there, else the CPU (``CONCORD_SITE_DEVICE``).

``auto`` (the default) picks ``cuda`` when PyTorch sees a CUDA device and ``cpu``
otherwise; ``cpu``, ``cuda`` and ``cuda:N`` ask for that device and refuse to start a
round without it (:class:`~site_node.errors.TrainingDeviceError`), so a GPU node whose
driver is missing says so instead of training 20x slower. Only the arithmetic moves:
datasets, the flattened updates, encryption and the DP accountant stay on the CPU, and
the model comes back to the CPU after each round.
"""

from __future__ import annotations

import re

import torch

from site_node.errors import TrainingDeviceError

__all__ = ["DEVICE_PATTERN", "resolve_device"]

#: What ``CONCORD_SITE_DEVICE`` accepts.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def resolve_device(setting: str = "auto") -> torch.device:
    """The device ``setting`` names on this machine (see the module)."""
    if not re.fullmatch(DEVICE_PATTERN, setting):
        raise TrainingDeviceError(
            f"unknown training device {setting!r}", hint="use auto, cpu, cuda or cuda:N"
        )
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingDeviceError(
                f"CONCORD_SITE_DEVICE={setting} but PyTorch sees no CUDA device",
                hint="check the GPU driver and the container's GPU resources, or use auto",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingDeviceError(
                f"CONCORD_SITE_DEVICE={setting} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)",
            )
    return device
