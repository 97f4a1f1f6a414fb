"""Per-sample-gradient modes: every catalogue network has a measured one, trains with it
(also through an empty Poisson batch), and gets what Opacus' default mode computes."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from concord_protocol.catalogue import CatalogueEntry
from concord_protocol.contract import ModelSpec, PrivacySpec, TaskSpec, TrainingSpec
from site_node.data import LocalDataset
from site_node.errors import PrivacyConfigurationError
from site_node.privacy import DpTrainer
from site_node.privacy.modes import (
    DEFAULT_MODE,
    MODES,
    TIE_MARGIN,
    GradSampleMode,
    choose,
    make_private,
    mode_for,
)
from site_node.training import build_model, flatten, list_models, train_round
from site_node.training.loops import loss_function

torch.set_num_threads(1)

#: Small inputs: the real-size networks (densenet121, resnet*) downsample 32x.
SHAPES = {"tabular": (6,), "image": (1, 32, 32)}


def _entry_id(entry: CatalogueEntry) -> str:
    return entry.name


def _build(entry: CatalogueEntry, seed: int = 0) -> nn.Module:
    shape = SHAPES[entry.modality]
    return build_model(
        ModelSpec(name=entry.name, version=entry.version),
        input_shape=shape,
        num_classes=2,
        seed=seed,
    )


def _data(entry: CatalogueEntry, n: int) -> LocalDataset:
    shape = SHAPES[entry.modality]
    gen = torch.Generator().manual_seed(0)
    segmentation = entry.task == "segmentation"
    labels = (
        torch.randint(0, 2, (n, *shape[1:]), generator=gen) if segmentation else torch.arange(n) % 2
    )
    return LocalDataset(
        features=torch.randn(n, *shape, generator=gen),
        labels=labels,
        num_classes=2,
        modality="test",
        task="segmentation" if segmentation else "classification",
    )


def _trainer(n: int, training: TrainingSpec) -> DpTrainer:
    return DpTrainer(
        PrivacySpec(epsilon=50.0, delta=1e-3, max_grad_norm=1.0),
        training,
        num_samples=n,
        noise_multiplier=1.0,
    )


def test_the_table_covers_exactly_the_catalogue() -> None:
    assert set(MODES) == {entry.name for entry in list_models()}


@pytest.mark.parametrize("entry", list_models(), ids=_entry_id)
def test_each_choice_follows_from_its_measurement(entry: CatalogueEntry) -> None:
    choice = MODES[entry.name]
    assert choice.mode in get_args(GradSampleMode)
    assert choice.measured
    assert choice.mode in choice.ratios  # measured, and found usable
    assert set(choice.ratios) <= set(get_args(GradSampleMode))
    assert choose(choice.ratios) == choice.mode


def test_the_choice_is_the_fastest_unless_hooks_is_as_fast() -> None:
    assert choose({"hooks": 2.0, "ghost": 1.5, "functorch": 3.0}) == "ghost"
    close = 2.0 * (1 - TIE_MARGIN / 2)
    assert choose({"hooks": 2.0, "ghost": close}) == "hooks"
    assert choose({"ghost": 1.5, "functorch": 1.4}) == "functorch"
    with pytest.raises(ValueError, match="no usable"):
        choose({"plain": 1.0})


@pytest.mark.parametrize("entry", list_models(), ids=_entry_id)
def test_the_chosen_mode_trains_through_an_empty_poisson_batch(entry: CatalogueEntry) -> None:
    """Six records in batches of one: each step samples every record with probability
    1/6, so a round of six steps draws an empty batch more often than not; the step must
    still be taken (noise only, no forward pass) and charged."""
    assert mode_for(_build(entry)) == MODES[entry.name].mode
    n, training = 6, TrainingSpec(rounds=1, batch_size=1, learning_rate=0.1)
    task = TaskSpec(kind=entry.task)
    for seed in range(20):
        model = _build(entry)
        sizes: list[int] = []
        model.register_forward_pre_hook(lambda _m, args, sizes=sizes: sizes.append(len(args[0])))
        before = flatten(model)
        dp = _trainer(n, training)
        result = train_round(model, _data(entry, n), training, dp=dp, seed=seed, task=task)
        assert result.steps == dp.steps_taken == dp.plan.steps_per_epoch == 6
        assert result.epsilon_spent is not None
        assert result.epsilon_spent > 0
        assert not np.array_equal(before, flatten(model))
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        assert 0 not in sizes  # an empty batch never reaches the network
        if len(sizes) < result.steps:  # a step without a forward pass: an empty batch
            return
    pytest.fail("no empty batch in 20 rounds")  # pragma: no cover


@pytest.mark.parametrize(
    "entry",
    [e for e in list_models() if MODES[e.name].mode != "hooks"],
    ids=_entry_id,
)
def test_the_chosen_mode_trains_what_opacus_default_mode_trains(entry: CatalogueEntry) -> None:
    """The same seed (sampling and noise) in the chosen mode and in ``hooks``: the same
    weights to float rounding, and the same accounting."""
    n, training = 12, TrainingSpec(rounds=1, local_epochs=2, batch_size=4, learning_rate=0.1)
    task = TaskSpec(kind=entry.task)
    trained = {}
    for mode in (MODES[entry.name].mode, "hooks"):
        model = _build(entry)
        dp = _trainer(n, training)
        result = train_round(
            model, _data(entry, n), training, dp=dp, seed=3, task=task, grad_sample_mode=mode
        )
        trained[mode] = (flatten(model), dp.history, result.epsilon_spent)
    (chosen, chosen_history, chosen_eps), (hooks, hooks_history, hooks_eps) = trained.values()
    assert chosen_history == hooks_history
    assert chosen_eps == hooks_eps
    np.testing.assert_allclose(chosen, hooks, rtol=1e-4, atol=1e-6)


def test_a_module_the_catalogue_did_not_build_trains_with_the_default_mode() -> None:
    assert mode_for(nn.Sequential(nn.Linear(3, 2))) == DEFAULT_MODE == "hooks"


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_ghost_clipping_needs_the_loss_of_each_record() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    loader = DataLoader(TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
    common = {
        "module": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "data_loader": loader,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
    }
    from opacus import PrivacyEngine

    with pytest.raises(PrivacyConfigurationError, match="loss of each record"):
        make_private(PrivacyEngine(), mode="ghost", loss=functional.cross_entropy, **common)  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigurationError, match="unknown per-sample gradient mode"):
        make_private(PrivacyEngine(), mode="vmap", loss=None, **common)  # type: ignore[arg-type]


@pytest.mark.parametrize("task", [TaskSpec(), TaskSpec(kind="segmentation", loss="dice_ce")])
def test_the_losses_give_each_records_loss_when_asked(task: TaskSpec) -> None:
    """What ghost clipping asks of a loss: ``reduction = "none"`` gives each record's own
    loss, and their mean is the batch's loss."""
    gen = torch.Generator().manual_seed(0)
    if task.kind == "segmentation":
        logits, labels = torch.randn(3, 2, 6, 6, generator=gen), torch.randint(0, 2, (3, 6, 6))
    else:
        logits, labels = torch.randn(3, 2, generator=gen), torch.tensor([0, 1, 1])
    loss = loss_function(task)
    batch = loss(logits, labels)
    alone = torch.stack([loss(logits[i : i + 1], labels[i : i + 1]) for i in range(3)])
    loss.reduction = "none"  # type: ignore[assignment]  # as Opacus ghost clipping sets it
    each = loss(logits, labels)
    assert each.shape == (3,)
    torch.testing.assert_close(each, alone)
    torch.testing.assert_close(each.mean(), batch)
