"""Physical batches (Opacus' BatchMemoryManager, the site's dp_max_physical_batch): a large
logical batch in smaller passes, with the same steps, sample rate, epsilon and weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant

from concord_protocol.contract import ModelSpec, PrivacySpec, TaskSpec, TrainingSpec
from site_node.data import LocalDataset
from site_node.errors import PrivacyConfigurationError
from site_node.privacy import DpTrainer
from site_node.privacy.modes import GradSampleMode
from site_node.training import build_model, flatten, train_round

torch.set_num_threads(1)

N, BATCH, SIGMA = 40, 10, 1.5  # sample rate 1/4: 4 steps per epoch
TRAINING = TrainingSpec(rounds=2, local_epochs=2, batch_size=BATCH, learning_rate=0.2)
CASES: dict[str, tuple[str, tuple[int, ...], str, GradSampleMode]] = {  # network, input, task, mode
    "mlp-hooks": ("tabular-mlp", (5,), "classification", "hooks"),
    "mlp-ghost": ("tabular-mlp", (5,), "classification", "ghost"),
    "cnn-hooks": ("image-cnn", (1, 16, 16), "classification", "hooks"),
    "cnn-functorch": ("image-cnn", (1, 16, 16), "classification", "functorch"),
    "unet-ghost": ("unet", (1, 16, 16), "segmentation", "ghost"),
}


def _data(shape: tuple[int, ...], task: str) -> LocalDataset:
    gen = torch.Generator().manual_seed(0)
    labels = (
        torch.randint(0, 2, (N, *shape[1:]), generator=gen)
        if task == "segmentation"
        else torch.arange(N) % 2
    )
    features = torch.randn(N, *shape, generator=gen)
    return LocalDataset(features, labels, 2, "test", task=task)  # type: ignore[arg-type]


def _fresh_epsilon(steps: int) -> float:
    """Epsilon from a brand-new Opacus accountant, independent of site_node code."""
    accountant = PRVAccountant()
    accountant.history = [(SIGMA, 1 / 4, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=1e-5))


def _train(
    name: str,
    shape: tuple[int, ...],
    task: str,
    mode: GradSampleMode,
    physical: int | None,
    rounds: int = 1,
) -> tuple[np.ndarray, DpTrainer, list[int], list[float]]:
    model = build_model(ModelSpec(name=name, version="1"), input_shape=shape, num_classes=2)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    dp = DpTrainer(
        PrivacySpec(epsilon=50.0, delta=1e-5, max_grad_norm=1.0),
        TRAINING,
        num_samples=N,
        noise_multiplier=SIGMA,
    )
    losses = []
    for r in range(rounds):
        result = train_round(
            model,
            _data(shape, task),
            TRAINING,
            dp=dp,
            seed=7 + r,
            task=TaskSpec(kind=task),
            grad_sample_mode=mode,
            max_physical_batch=physical,
        )
        assert result.steps == TRAINING.local_epochs * 4  # logical steps, not passes
        assert result.epsilon_spent == dp.epsilon_spent()
        losses.append(result.mean_loss)
    return flatten(model), dp, sizes, losses


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_physical_batches_change_neither_the_accounting_nor_the_weights(case: str) -> None:
    name, shape, task, mode = CASES[case]
    whole, whole_dp, whole_sizes, whole_losses = _train(name, shape, task, mode, None, rounds=2)
    split, split_dp, split_sizes, split_losses = _train(name, shape, task, mode, 3, rounds=2)
    # The same steps at the same rate and noise: the same history and epsilon, which is a
    # fresh Opacus accountant's for 2 rounds of 8 steps.
    assert split_dp.history == whole_dp.history == ((SIGMA, 0.25, 16),)
    assert split_dp.steps_taken == whole_dp.steps_taken == 16
    assert split_dp.rounds_completed == whole_dp.rounds_completed == 2
    assert split_dp.epsilon_spent() == whole_dp.epsilon_spent()
    assert split_dp.epsilon_spent() == pytest.approx(_fresh_epsilon(16), abs=1e-9)
    # The same records and noise (one seed), summed in another order: float rounding only.
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split_losses, whole_losses, rtol=1e-5)
    # Really split: no pass holds more than 3 records, and the records are the same ones.
    assert max(split_sizes) <= 3 < max(whole_sizes)
    assert sum(split_sizes) == sum(whole_sizes)
    assert len(split_sizes) > len(whole_sizes)


def test_a_physical_batch_below_one_is_refused_before_anything_is_charged() -> None:
    name, shape, task, mode = CASES["mlp-hooks"]
    with pytest.raises(PrivacyConfigurationError, match="1 or more"):
        _train(name, shape, task, mode, 0)
