"""How Opacus computes per-sample gradients for each catalogue network, and why.

DP-SGD clips every record's gradient before summing, so Opacus must compute per-record
gradients (or, for ghost clipping, their norms). Opacus 1.6 has several ways, its
``grad_sample_mode``:

* ``hooks``: forward and backward hooks on every layer with a hand-written per-sample
  gradient (unfold and einsum for convolutions; torch.func for layers without one).
  Opacus' default.
* ``functorch``: the same hooks, each layer's per-sample gradient from ``torch.func``
  (vmap of the layer's own backward) instead of the hand-written ones.
* ``ew``: PyTorch's expanded weights (``call_for_per_sample_grads``): per-sample gradients
  inside autograd, no hooks. Supports fewer layers (no transposed convolution) and fails on
  the DenseNets (a view error inside expanded weights).
* ``ghost``: fast gradient clipping: a first backward pass computes each record's gradient
  norm (without instantiating the gradients of linear layers; other layers instantiate them
  one layer at a time and keep only the norm), a second, plain backward pass sums the
  gradients already scaled by each record's clipping factor. It needs the loss of each
  record (``DPLossFastGradientClipping`` over a loss whose ``reduction`` can be ``"none"``,
  :func:`site_node.training.loops.loss_function`).

Every mode computes the same clipped sum (checked against a per-record loop by
``benchmarks/dp_cost.py``); they differ in time and memory. :data:`MODES` is the mode each
catalogue network trains with, chosen from that benchmark's figures (docs/benchmarks.md,
"DP-SGD cost at real size"); each entry carries the measurement that justifies it. The
rule: the fastest mode that gives the right gradients, unless it is within
:data:`TIE_MARGIN` of ``hooks`` (the figures of one loaded 2-core machine are noisy by
about that much): then ``hooks``, Opacus' default and the most used.

The mode changes neither the privacy accounting (the same steps at the same sample rate
and noise) nor what a round computes, only how fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader

from site_node.errors import PrivacyConfigurationError
from site_node.training.catalogue import catalogue_name

__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "TIE_MARGIN",
    "GradSampleMode",
    "ModeChoice",
    "PrivateParts",
    "choose",
    "empty_step",
    "make_private",
    "mode_for",
]

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]
Loss = Callable[[torch.Tensor, torch.Tensor], Any]

#: A network that is not the catalogue's (a module built by hand) trains with Opacus' default.
DEFAULT_MODE: GradSampleMode = "hooks"

#: Another mode replaces ``hooks`` only when it is faster by more than this fraction.
TIE_MARGIN = 0.10


@dataclass(frozen=True)
class ModeChoice:
    """The mode one catalogue network trains with, and the measurement behind it."""

    mode: GradSampleMode
    #: DP step time / plain step time per mode that worked, in the benchmark named below.
    ratios: Mapping[str, float]
    #: Where the ratios come from: input, batch, command, machine.
    measured: str


_RUN = "`benchmarks/dp_cost.py`, 2 CPU cores, 2 threads, 2026-12-04"
_2D = f"1x224x224, batch 8, {_RUN}"

#: The mode of every catalogue network, with the DP/plain step time of each mode that gave
#: the right gradients (docs/benchmarks.md, "DP-SGD cost at real size", has the memory too).
MODES: Mapping[str, ModeChoice] = {
    "tabular-mlp": ModeChoice(
        "hooks",
        {"hooks": 2.37, "functorch": 4.17, "ew": 2.80, "ghost": 2.55},
        f"30 features, batch 256, {_RUN}; ghost holds 1.26x plain memory, hooks 2.01x",
    ),
    "image-cnn": ModeChoice(
        "hooks",
        {"hooks": 1.94, "functorch": 2.32, "ew": 2.00, "ghost": 2.81},
        f"1x224x224, batch 32, {_RUN}",
    ),
    "image-densenet": ModeChoice(
        "hooks",
        {"hooks": 1.80, "functorch": 2.40, "ghost": 2.43},
        f"1x224x224, batch 32, {_RUN}; ew fails (a view error inside expanded weights)",
    ),
    "densenet121": ModeChoice(
        "hooks",
        {"hooks": 2.78, "functorch": 2.93, "ghost": 3.86},
        f"{_2D}; ew fails (a view error inside expanded weights); a second run under load: "
        "hooks 2.82x, functorch 2.58x (within the tie margin)",
    ),
    "resnet18": ModeChoice(
        "hooks",
        {"hooks": 2.78, "functorch": 2.83, "ew": 2.61, "ghost": 2.64},
        f"{_2D}; ew and ghost within the tie margin (second run: hooks 3.53x, ew 3.55x)",
    ),
    "resnet50": ModeChoice(
        "hooks",
        {"hooks": 2.89, "functorch": 3.93, "ew": 5.54, "ghost": 3.45},
        _2D,
    ),
    "unet": ModeChoice(
        "functorch",
        {"hooks": 3.88, "functorch": 2.08, "ghost": 4.87},
        f"1x96x96x96, batch 2, 3 rounds, {_RUN}; ew fails (no transposed convolution)",
    ),
    "segresnet": ModeChoice(
        "ew",
        {"hooks": 4.53, "functorch": 1.91, "ew": 1.43, "ghost": 5.87},
        f"1x96x96x96, batch 2, 2 rounds, {_RUN}",
    ),
}


def choose(times: Mapping[str, float]) -> GradSampleMode:
    """The mode to train with, from step times (or DP/plain ratios) of the modes that gave
    the right gradients and stepped on an empty batch: the fastest, unless ``hooks`` is
    within :data:`TIE_MARGIN` of it.

    Raises:
        ValueError: no mode of Opacus' among ``times``.
    """
    usable = {m: t for m, t in times.items() if m in get_args(GradSampleMode)}
    if not usable:
        raise ValueError("no usable per-sample gradient mode was measured")
    best = min(usable, key=usable.__getitem__)
    if "hooks" in usable and usable[best] >= usable["hooks"] * (1 - TIE_MARGIN):
        return "hooks"
    return best  # type: ignore[return-value]


def mode_for(module: nn.Module) -> GradSampleMode:
    """The per-sample-gradient mode ``module`` trains with: its catalogue network's entry in
    :data:`MODES`, :data:`DEFAULT_MODE` for a module the catalogue did not build."""
    name = catalogue_name(module)
    if name is None or name not in MODES:
        return DEFAULT_MODE
    return MODES[name].mode


class PrivateParts(NamedTuple):
    """What Opacus' ``make_private`` returns, the same shape for every mode."""

    module: AbstractGradSampleModule
    optimizer: DPOptimizer
    #: The loss to train with: the one given (``None`` if none was), or for ghost clipping
    #: Opacus' two-pass wrapper of it, whose ``backward()`` does the clipping.
    loss: Loss | None
    data_loader: DataLoader[Any]


def make_private(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    mode: GradSampleMode,
    loss: Loss | None,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
) -> PrivateParts:
    """``engine.make_private`` with flat clipping and mean loss reduction in ``mode``.

    Raises:
        PrivacyConfigurationError: an unknown mode, or ghost clipping without a loss that
            can return each record's loss (a ``reduction`` attribute).
    """
    if mode not in get_args(GradSampleMode):
        raise PrivacyConfigurationError(f"unknown per-sample gradient mode {mode!r}")
    common: dict[str, Any] = {
        "module": module,
        "optimizer": optimizer,
        "data_loader": data_loader,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "poisson_sampling": poisson_sampling,
        "noise_generator": noise_generator,
        "grad_sample_mode": mode,
    }
    if mode == "ghost":
        if loss is None or not isinstance(getattr(loss, "reduction", None), str):
            raise PrivacyConfigurationError(
                "ghost clipping needs the loss of each record: a loss module with a "
                "`reduction` attribute (site_node.training.loops.loss_function)"
            )
        module_, optimizer_, criterion, loader = engine.make_private(criterion=loss, **common)
        return PrivateParts(module_, optimizer_, criterion, loader)
    module_, optimizer_, loader = engine.make_private(**common)
    return PrivateParts(module_, optimizer_, loss, loader)


def empty_step(optimizer: DPOptimizer) -> None:
    """One DP-SGD step for an empty Poisson batch: the noise alone, charged as every step.

    No forward or backward pass. The clipped sum of no gradients is 0, and per-sample
    gradients of zero records are not something every mode and layer can compute:
    ``functorch`` and ``ew`` refuse a batch of 0, and so does Opacus' torch.func fallback
    for layers it has no per-sample gradient of (the UNet's transposed convolutions), in any
    mode; MONAI's ResNet cannot even flatten an empty batch. So the optimizer is handed
    that sum directly, as empty per-sample gradients (or, for ghost clipping, whose
    optimizer sums ``p.grad``, zero gradients), and steps: noise, the division by the
    expected batch size, the accountant's hook, the update. Inside a
    ``BatchMemoryManager`` an empty logical batch is one physical batch that ends it, so
    this step is taken, never skipped.
    """
    optimizer.zero_grad(set_to_none=True)
    ghost = isinstance(optimizer, DPOptimizerFastGradientClipping)
    for p in optimizer.params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
