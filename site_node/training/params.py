"""Model parameters as one flat vector, and a manifest both sides can compare.

The order is ``model.named_parameters()`` order (registration order), restricted to
trainable parameters: stable for a given catalogue entry, hyperparameters and input shape,
in every process. :func:`manifest_digest` lets a site and the server check they agree on
names and shapes before exchanging vectors.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

from site_node.errors import ParameterShapeError

__all__ = [
    "ManifestEntry",
    "flatten",
    "manifest_digest",
    "num_parameters",
    "parameter_manifest",
    "unflatten_into",
]

ManifestEntry = tuple[str, tuple[int, ...]]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the length of :func:`flatten`)."""
    return sum(p.numel() for _, p in _trainable(model))


def flatten(model: nn.Module) -> np.ndarray:
    """All trainable parameters as one float64 1-D array, in manifest order."""
    params = _trainable(model)
    if not params:
        return np.zeros(0, dtype=np.float64)
    with torch.no_grad():
        return torch.cat(
            [p.detach().reshape(-1).to(torch.float64).cpu() for _, p in params]
        ).numpy()


def unflatten_into(model: nn.Module, vector: np.ndarray) -> None:
    """Copy ``vector`` (as produced by :func:`flatten`) into ``model``'s parameters in place.

    Raises:
        ParameterShapeError: ``vector`` is not 1-D, has the wrong length, or is not finite.
    """
    array = np.asarray(vector)
    expected = num_parameters(model)
    if array.ndim != 1:
        raise ParameterShapeError(f"parameter vector must be 1-D, got shape {array.shape}")
    if array.shape[0] != expected:
        raise ParameterShapeError(
            f"parameter vector has {array.shape[0]} values, the model has {expected}",
            hint="check that both sides use the same model spec and input shape "
            "(compare manifest digests)",
        )
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise ParameterShapeError("parameter vector holds non-finite or non-numeric values")
    source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    offset = 0
    with torch.no_grad():
        for _, p in _trainable(model):
            n = p.numel()
            p.copy_(source[offset : offset + n].reshape(p.shape).to(p.dtype))
            offset += n


def parameter_manifest(model: nn.Module) -> list[ManifestEntry]:
    """``(name, shape)`` of every trainable parameter, in :func:`flatten` order."""
    return [(name, tuple(int(d) for d in p.shape)) for name, p in _trainable(model)]


def manifest_digest(manifest: list[ManifestEntry] | nn.Module) -> str:
    """SHA-256 (hex) of the manifest's canonical JSON ``[[name, [dims...]], ...]``."""
    entries = parameter_manifest(manifest) if isinstance(manifest, nn.Module) else manifest
    payload = json.dumps(
        [[name, list(shape)] for name, shape in entries], separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(payload.encode("ascii")).hexdigest()
