"""Train/evaluate loops, DP training on the demo data, and the centralised baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from concord_protocol.contract import ModelSpec, PrivacySpec, TrainingSpec
from site_node.data import LocalDataset, breast_cancer_holdout, breast_cancer_site
from site_node.errors import EmptyDatasetError
from site_node.privacy import DpTrainer
from site_node.training import build_model, centralised_baseline, evaluate, train_round

torch.set_num_threads(1)

MLP = ModelSpec(name="tabular-mlp", version="1", hyperparameters={"hidden": 16})


def _separable(n: int = 64, seed: int = 0) -> LocalDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, 4, generator=gen) + labels[:, None].float() * 3.0
    return LocalDataset(features=features, labels=labels, num_classes=2, modality="tabular")


class _Fixed(torch.nn.Module):
    """Returns stored logits, for checking metrics against scikit-learn."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.offset = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.offset : self.offset + len(x)]
        self.offset += len(x)
        return out


def test_plain_training_learns_and_is_reproducible() -> None:
    data = _separable()
    training = TrainingSpec(rounds=1, local_epochs=5, batch_size=16, learning_rate=0.3)
    a = build_model(MLP, input_shape=(4,), num_classes=2)
    b = build_model(MLP, input_shape=(4,), num_classes=2)
    before = evaluate(a, data)
    result = train_round(a, data, training, dp=None, seed=3)
    train_round(b, data, training, dp=None, seed=3)
    after = evaluate(a, data)
    assert result.num_samples == 64
    assert result.steps == 20
    assert result.epsilon_spent is None
    assert after.loss < before.loss
    assert after.accuracy > 0.9
    assert torch.equal(a(data.features), b(data.features))


def test_adam_optimizer_is_used() -> None:
    data = _separable()
    training = TrainingSpec(rounds=1, batch_size=16, learning_rate=0.01, optimizer="adam")
    model = build_model(MLP, input_shape=(4,), num_classes=2)
    assert train_round(model, data, training, dp=None, seed=0).steps == 4


def test_evaluate_matches_sklearn_binary_and_multiclass() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1])
    logits = torch.randn(8, 2, generator=gen)
    data = LocalDataset(
        features=torch.zeros(8, 1), labels=labels, num_classes=2, modality="tabular"
    )
    result = evaluate(_Fixed(logits), data, batch_size=3)
    probs = torch.softmax(logits, 1)[:, 1].numpy()
    assert result.auc == pytest.approx(roc_auc_score(labels.numpy(), probs))
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))

    labels3 = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    logits3 = torch.randn(9, 3, generator=gen)
    data3 = LocalDataset(
        features=torch.zeros(9, 1), labels=labels3, num_classes=3, modality="tabular"
    )
    expected = roc_auc_score(
        labels3.numpy(), torch.softmax(logits3, 1).numpy(), multi_class="ovr", average="macro"
    )
    assert evaluate(_Fixed(logits3), data3).auc == pytest.approx(expected)


def test_evaluate_is_nan_safe() -> None:
    one_class = LocalDataset(
        features=torch.zeros(4, 1),
        labels=torch.zeros(4, dtype=torch.int64),
        num_classes=2,
        modality="tabular",
    )
    result = evaluate(_Fixed(torch.randn(4, 2)), one_class)
    assert math.isnan(result.auc)
    assert not math.isnan(result.accuracy)
    empty = LocalDataset(
        features=torch.zeros(0, 1),
        labels=torch.zeros(0, dtype=torch.int64),
        num_classes=2,
        modality="tabular",
    )
    assert math.isnan(evaluate(_Fixed(torch.randn(0, 2)), empty).loss)


def test_training_on_empty_data_is_refused() -> None:
    empty = LocalDataset(
        features=torch.zeros(0, 4),
        labels=torch.zeros(0, dtype=torch.int64),
        num_classes=2,
        modality="tabular",
    )
    model = build_model(MLP, input_shape=(4,), num_classes=2)
    with pytest.raises(EmptyDatasetError):
        train_round(model, empty, TrainingSpec(rounds=1), dp=None)


def test_centralised_baseline_on_pooled_sites() -> None:
    sites = [breast_cancer_site(i)[0] for i in range(3)]
    training = TrainingSpec(rounds=5, batch_size=32, learning_rate=0.3)
    result = centralised_baseline(sites, breast_cancer_holdout(), MLP, training)
    assert result.num_train_samples == sum(len(s) for s in sites)
    assert result.epochs == 5
    assert result.metrics.num_samples == 114
    assert result.metrics.accuracy > 0.9
    assert result.metrics.auc > 0.95


@pytest.mark.slow
def test_dp_training_on_a_site_beats_chance_on_the_holdout() -> None:
    train, _ = breast_cancer_site(0)
    holdout = breast_cancer_holdout()
    training = TrainingSpec(rounds=10, batch_size=32, learning_rate=0.5)
    privacy = PrivacySpec(epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    dp = DpTrainer(privacy, training, num_samples=len(train))
    model = build_model(MLP, input_shape=train.input_shape, num_classes=2)
    chance = max(holdout.label_counts()) / len(holdout)
    for r in range(training.rounds):
        result = train_round(model, train, training, dp=dp, seed=r)
    metrics = evaluate(model, holdout)
    assert result.epsilon_spent is not None
    assert result.epsilon_spent <= 3.0
    assert metrics.accuracy > chance + 0.1
    assert metrics.auc > 0.85
    assert np.isfinite(result.mean_loss)


def test_baseline_recovers_when_the_dp_learning_rate_diverges_without_clipping() -> None:
    """A rate tuned for clipped DP gradients makes plain SGD diverge on the image CNN: the
    baseline retries at a tenth of the rate and says which one it used."""
    import math

    from concord_protocol.contract import ModelSpec, TrainingSpec
    from site_node.data.demo import synthetic_images_holdout, synthetic_images_site
    from site_node.training.baseline import centralised_baseline

    spec = ModelSpec(name="image-cnn", version="1", hyperparameters={"depth": 2})
    train = [synthetic_images_site(i, n_samples=64, image_size=16)[0] for i in range(3)]
    result = centralised_baseline(
        train,
        synthetic_images_holdout(n_samples=64, image_size=16),
        spec,
        TrainingSpec(rounds=1, local_epochs=1, batch_size=32, learning_rate=5.0),
    )
    assert result.learning_rate < 5.0
    assert math.isfinite(result.metrics.loss)
