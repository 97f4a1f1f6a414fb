"""Local training and evaluation loops (no Flower, no encryption).

:func:`train_round` runs one federated round of local training, privately when given a
:class:`~site_node.privacy.DpTrainer`; :func:`evaluate` scores a model on a split. Nothing
here logs records, tensors or per-record values.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader

from concord_protocol.contract import TaskSpec, TrainingSpec
from concord_protocol.errors import IncompatibleInputError
from site_node.data.dataset import LocalDataset
from site_node.errors import EmptyDatasetError
from site_node.training.segmentation import per_record_scores, segmentation_loss

if TYPE_CHECKING:
    from site_node.privacy.dp import DpTrainer
    from site_node.privacy.modes import GradSampleMode

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "loss_function",
    "make_optimizer",
    "train_round",
]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one local round.

    Attributes:
        num_samples: records in the local training split (the aggregation weight).
        mean_loss: mean training loss over the round's batches, weighted by batch size. Not
            privatised: do not send it off-site unless the site policy allows.
        steps: optimizer steps taken.
        epsilon_spent: epsilon spent by this site in the study so far (``None`` without DP).
    """

    num_samples: int
    mean_loss: float
    steps: int
    epsilon_spent: float | None


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one split (``nan`` where undefined or not of the task).

    Classification sets ``accuracy`` and ``auc``; segmentation ``dice`` (the mean over
    records) and ``hd95`` (the median over records, in voxels), per
    :mod:`site_node.training.segmentation`.
    """

    num_samples: int
    loss: float
    accuracy: float
    auc: float
    dice: float = math.nan
    hd95: float = math.nan

    def metrics(self, task: TaskSpec) -> dict[str, float]:
        """The task's metrics by name (what a round table or report shows)."""
        return {name: float(getattr(self, name)) for name in task.metrics}


def loss_function(task: TaskSpec) -> nn.Module:
    """The contract's training loss: cross-entropy, or a segmentation loss; the batch mean
    of the records' losses, and each record's with ``reduction = "none"`` (what Opacus'
    ghost clipping needs)."""
    if task.kind == "segmentation":
        return segmentation_loss(task)
    return nn.CrossEntropyLoss()


def make_optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    """The optimizer named by ``training`` over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.learning_rate)
    return torch.optim.SGD(params, lr=training.learning_rate, momentum=0.0)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global RNG inside the block only (Opacus noise and sampling use it)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    epochs: int,
    device: torch.device,
    loss_fn: Loss,
    empty_step: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """Train over ``epochs`` passes of ``loader``; the mean loss and the batches seen.

    An empty batch (DP-SGD's Poisson sampling draws one now and then; a plain loader never
    does) is ``empty_step``: still a DP step, of noise only, without a forward pass.
    """
    total_loss, total_n, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x_cpu, y_cpu in loader:
            if len(y_cpu) == 0:
                if empty_step is not None:
                    empty_step()
                    steps += 1
                continue
            x, y = x_cpu.to(device), y_cpu.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(module(x), y)
            total_loss += float(loss.detach()) * len(y)
            total_n += len(y)
            loss.backward()
            optimizer.step()
            steps += 1
    return (total_loss / total_n if total_n else math.nan), steps


def train_round(
    model: nn.Module,
    dataset: LocalDataset,
    training: TrainingSpec,
    *,
    dp: DpTrainer | None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    task: TaskSpec | None = None,
    max_physical_batch: int | None = None,
    grad_sample_mode: GradSampleMode | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``training.local_epochs`` epochs on ``dataset``, with
    the loss of ``task`` (classification's cross-entropy when not given).

    The arithmetic runs on ``device`` (:func:`site_node.training.device.resolve_device`);
    batches are moved there one at a time and the model is back on the CPU afterwards.

    With ``dp``, training is DP-SGD with Poisson sampling under the study-wide plan of
    ``dp`` (which must have been built for ``len(dataset)`` records and this training
    spec); the round is refused beforehand if it would exceed the target epsilon. Without
    ``dp``, plain minibatch training with shuffling. A fresh optimizer is made each round.
    ``seed`` makes shuffling, sampling and noise reproducible without touching the caller's
    RNG state.

    Two DP options change cost, not results or accounting (:meth:`DpTrainer.private_round`):
    ``max_physical_batch`` (the site's ``dp_max_physical_batch``) bounds the records in one
    forward/backward pass, so that a contract's large logical batch fits in memory;
    ``grad_sample_mode`` overrides how Opacus computes per-sample gradients (by default the
    mode :mod:`site_node.privacy.modes` chose for the catalogue network). ``steps`` counts
    optimizer steps, one per logical batch.

    Raises:
        EmptyDatasetError: no training records.
        IncompatibleInputError: the dataset is labelled for another task.
        PrivacyBudgetExhaustedError: (DP) the round would exceed the target epsilon.
        DatasetMismatchError: (DP) ``dataset`` is not the size ``dp`` was planned for.
    """
    if len(dataset) == 0:
        raise EmptyDatasetError("the training split has no records")
    task = task or TaskSpec()
    if task.kind != dataset.task:
        raise IncompatibleInputError(
            f"the study is a {task.kind} task; the dataset is labelled for {dataset.task}"
        )
    target = torch.device(device)
    loss_fn = loss_function(task)
    model.train()
    model.to(target)
    try:
        optimizer = make_optimizer(model, training)
        with _seeded(seed):
            if dp is None:
                loader: DataLoader[Any] = DataLoader(
                    dataset.as_torch(), batch_size=training.batch_size, shuffle=True
                )
                mean_loss, steps = _run_epochs(
                    model, optimizer, loader, training.local_epochs, target, loss_fn
                )
                return TrainResult(len(dataset), mean_loss, steps, None)
            loader = DataLoader(dataset.as_torch(), batch_size=training.batch_size)
            steps_before = dp.steps_taken
            with (
                dp.private_round(
                    model,
                    optimizer,
                    loader,
                    loss=loss_fn,
                    grad_sample_mode=grad_sample_mode,
                    max_physical_batch=max_physical_batch,
                ) as private,
                warnings.catch_warnings(),
            ):
                # Opacus' hooks on the first layer: inputs never require grad. Harmless.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                mean_loss, _ = _run_epochs(
                    private.module,
                    private.optimizer,
                    private.data_loader,
                    training.local_epochs,
                    target,
                    private.loss or loss_fn,
                    private.empty_step,
                )
            # Physical batches are not steps: the optimizer steps once per logical batch,
            # and each of those steps is what the accountant records.
            steps = dp.steps_taken - steps_before
        return TrainResult(len(dataset), mean_loss, steps, dp.epsilon_spent())
    finally:
        model.to("cpu")


def _macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUC of class 1. Multiclass: mean one-vs-rest AUC over classes that have both
    positives and negatives. ``nan`` when no class qualifies (e.g. one class only)."""
    num_classes = probs.shape[1]
    classes = [1] if num_classes == 2 else list(range(num_classes))
    scores = []
    for c in classes:
        positive = labels == c
        if positive.any() and (~positive).any():
            scores.append(float(roc_auc_score(positive.astype(int), probs[:, c])))
    return float(np.mean(scores)) if scores else math.nan


#: Input values per scoring pass (a bound on the activations held at once).
_VOXELS_PER_PASS = 2**21


@torch.no_grad()
def score(
    model: nn.Module,
    dataset: LocalDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``model``'s logits for every record, ``(N, num_classes)`` (segmentation: ``(N,
    num_classes, *spatial)``), in eval mode, without gradients, computed on ``device`` and
    returned on the CPU (the model's train/eval mode and device are restored afterwards).

    Raises:
        IncompatibleInputError: the model does not output one score per class.
    """
    was_training = model.training
    target = torch.device(device)
    model.eval()
    model.to(target)
    # Records per forward pass: ``batch_size``, fewer for large images or volumes.
    per_record = math.prod(dataset.input_shape)
    step = max(1, min(batch_size, _VOXELS_PER_PASS // max(1, per_record)))
    try:
        with torch.no_grad():
            logits = torch.cat(
                [model(x.to(target)).cpu() for x in torch.split(dataset.features, step)],
                dim=0,
            ).float()
    finally:
        model.train(was_training)
        model.to("cpu")
    expected = (dataset.num_classes, *dataset.labels.shape[1:])
    if tuple(logits.shape[1:]) != expected:
        raise IncompatibleInputError(
            f"model outputs {tuple(logits.shape[1:])} scores per record, the dataset has "
            f"{dataset.num_classes} classes"
        )
    return logits


def evaluate(
    model: nn.Module,
    dataset: LocalDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Loss and metrics of ``model`` on ``dataset``: for classification, mean cross-entropy,
    accuracy and AUC; for segmentation (``dataset.task``), the mean voxel cross-entropy,
    the mean of each record's Dice and the median of each record's HD95.

    AUC is computed with scikit-learn: for binary tasks on the class-1 probability, for
    multiclass as the macro one-vs-rest average over classes present. Metrics that are not
    defined (no records; a single class for AUC) are ``nan``. The model's train/eval mode is
    restored afterwards.
    """
    n = len(dataset)
    if n == 0:
        return EvalResult(0, math.nan, math.nan, math.nan)
    logits = score(model, dataset, batch_size=batch_size, device=device)
    loss = float(functional.cross_entropy(logits, dataset.labels))
    if dataset.task == "segmentation":
        dice, hd95 = per_record_scores(logits, dataset.labels, dataset.num_classes)
        return EvalResult(
            n, loss, math.nan, math.nan, dice=float(dice.mean()), hd95=float(np.median(hd95))
        )
    accuracy = float((logits.argmax(dim=1) == dataset.labels).float().mean())
    probs = torch.softmax(logits, dim=1).double().numpy()
    return EvalResult(n, loss, accuracy, _macro_auc(dataset.labels.numpy(), probs))
