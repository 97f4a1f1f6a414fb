"""A centralised, non-private baseline: what the model reaches on pooled data.

Used by the demo to print federated results next to the result a single data holder with
all sites' records would get (same model, same number of passes over the data, no DP).
It never runs at a real site: pooling is exactly what a federation avoids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from concord_protocol.contract import ModelSpec, TaskSpec, TrainingSpec
from site_node.data.dataset import LocalDataset
from site_node.errors import DatasetError, TrainingDivergedError
from site_node.training.catalogue import build_model
from site_node.training.loops import EvalResult, evaluate, train_round

__all__ = ["BaselineResult", "centralised_baseline", "pool"]


@dataclass(frozen=True)
class BaselineResult:
    """Metrics of the centralised baseline on the test set."""

    num_train_samples: int
    epochs: int
    metrics: EvalResult
    learning_rate: float = 0.0


def pool(datasets: Sequence[LocalDataset]) -> LocalDataset:
    """Concatenate datasets with the same input shape and classes."""
    if not datasets:
        raise DatasetError("nothing to pool")
    first = datasets[0]
    for other in datasets[1:]:
        if (other.input_shape, other.num_classes, other.task) != (
            first.input_shape,
            first.num_classes,
            first.task,
        ):
            raise DatasetError("datasets to pool differ in input shape, classes or task")
    return LocalDataset(
        features=torch.cat([d.features for d in datasets]),
        labels=torch.cat([d.labels for d in datasets]),
        num_classes=first.num_classes,
        modality=first.modality,
        feature_names=first.feature_names,
        class_names=first.class_names,
        split="train",
        task=first.task,
    )


def centralised_baseline(
    train: LocalDataset | Sequence[LocalDataset],
    test: LocalDataset,
    spec: ModelSpec,
    training: TrainingSpec,
    *,
    seed: int = 0,
    task: TaskSpec | None = None,
) -> BaselineResult:
    """Train ``spec`` without DP on the pooled ``train`` data, evaluate on ``test``.

    Training runs ``training.rounds`` x ``training.local_epochs`` epochs (the federation's
    number of passes) with the study's optimizer, learning rate and batch size. A study's
    learning rate is tuned for DP-SGD, whose clipped gradients keep it stable; without
    clipping it can diverge. If it does (a non-finite loss or weights), training restarts
    at a tenth of the rate, up to three times; ``learning_rate`` says which rate was used.
    """
    pooled = train if isinstance(train, LocalDataset) else pool(train)
    task = task or TaskSpec(kind=pooled.task)
    rate = training.learning_rate
    for _attempt in range(4):
        model = build_model(
            spec, input_shape=pooled.input_shape, num_classes=pooled.num_classes, seed=seed
        )
        spec_now = training.model_copy(update={"learning_rate": rate})
        losses = [
            train_round(model, pooled, spec_now, dp=None, seed=seed + r, task=task).mean_loss
            for r in range(training.rounds)
        ]
        finite = all(math.isfinite(loss) for loss in losses) and all(
            bool(torch.isfinite(p).all()) for p in model.parameters()
        )
        if finite:
            return BaselineResult(
                num_train_samples=len(pooled),
                epochs=training.rounds * training.local_epochs,
                metrics=evaluate(model, test),
                learning_rate=rate,
            )
        rate /= 10
    raise TrainingDivergedError(
        f"the centralised baseline diverged even at learning rate {rate * 10:g}"
    )
