"""Segmentation at the site: per-record Dice and HD95, the losses, training and release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from concord_protocol.catalogue import check_task
from concord_protocol.contract import ModelSpec, PrivacySpec, TaskSpec, TrainingSpec
from concord_protocol.errors import IncompatibleInputError
from concord_protocol.eval_histograms import HD95_EDGES, metrics
from site_node.data import LocalDataset
from site_node.data.demo import synthetic_volumes_holdout, synthetic_volumes_site
from site_node.errors import DatasetError
from site_node.privacy import DpTrainer
from site_node.privacy.dp_metrics import noisy_histogram
from site_node.training import build_model, centralised_baseline, evaluate, train_round
from site_node.training.segmentation import per_record_scores, segmentation_loss

torch.set_num_threads(1)

SEGMENTATION = TaskSpec(kind="segmentation")
SMALL_UNET = ModelSpec(
    name="unet", version="1", hyperparameters={"base_channels": 8, "levels": 3, "res_units": 1}
)


def _logits_for(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``labels``."""
    return one_hot(labels.unsqueeze(1), num_classes).float() * 10.0


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, 12, 12, dtype=torch.int64)
    masks[0, 2:6, 2:6] = 1
    masks[1, 4:9, 3:10] = 1
    return masks


def test_a_perfect_prediction_scores_dice_one_and_hd95_zero() -> None:
    masks = _masks()
    dice, hd95 = per_record_scores(_logits_for(masks, 2), masks, 2)
    assert dice.tolist() == [1.0, 1.0]
    assert hd95.tolist() == [0.0, 0.0]


def test_scores_match_monai_where_both_masks_are_present() -> None:
    truth = _masks()
    predicted = torch.roll(truth, shifts=(1, 2), dims=(1, 2))
    dice, hd95 = per_record_scores(_logits_for(predicted, 2), truth, 2)
    p, t = one_hot(predicted.unsqueeze(1), 2), one_hot(truth.unsqueeze(1), 2)
    expected_dice = compute_dice(p, t, include_background=False)[:, 0]
    expected_hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95)[:, 0]
    np.testing.assert_allclose(dice, expected_dice.double().numpy())
    np.testing.assert_allclose(hd95, expected_hd.double().numpy())
    assert (dice < 1).all()
    assert (hd95 > 0).all()


def test_empty_masks_get_defined_bounded_scores() -> None:
    empty = torch.zeros(3, 8, 8, dtype=torch.int64)
    one = empty.clone()
    one[1, 2:4, 2:4] = 1  # record 1: the truth has a lesion, the prediction none
    predicted = empty.clone()
    predicted[2, 5:7, 5:7] = 1  # record 2: a lesion predicted where there is none
    dice, hd95 = per_record_scores(_logits_for(predicted, 2), one, 2)
    diagonal = math.sqrt(2 * 7**2)
    assert dice.tolist() == [1.0, 0.0, 0.0]
    assert hd95.tolist() == pytest.approx([0.0, diagonal, diagonal])


def test_multi_class_scores_average_the_foreground_classes() -> None:
    truth = torch.zeros(1, 10, 10, dtype=torch.int64)
    truth[0, 1:4, 1:4] = 1
    truth[0, 6:9, 6:9] = 2
    predicted = truth.clone()
    predicted[predicted == 2] = 0  # class 2 missed entirely
    dice, hd95 = per_record_scores(_logits_for(predicted, 3), truth, 3)
    assert dice.tolist() == [0.5]
    assert hd95.tolist() == pytest.approx([math.sqrt(2 * 9**2) / 2])


def test_scores_refuse_logits_of_another_shape() -> None:
    with pytest.raises(ValueError, match="not"):
        per_record_scores(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64), 2)


@pytest.mark.parametrize("loss", ["dice", "dice_ce"])
def test_the_losses_are_the_mean_of_per_record_losses(loss: str) -> None:
    fn = segmentation_loss(TaskSpec(kind="segmentation", loss=loss))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 8, 8, generator=gen)
    labels = torch.randint(0, 2, (4, 8, 8), generator=gen)
    whole = fn(logits, labels)
    each = torch.stack([fn(logits[i : i + 1], labels[i : i + 1]) for i in range(4)])
    # Opacus' per-sample gradients assume exactly this (loss_reduction="mean").
    assert float(whole) == pytest.approx(float(each.mean()), rel=1e-5)
    assert float(fn(_logits_for(labels, 2) * 10, labels)) < float(whole)


def test_a_segmentation_dataset_needs_one_label_per_voxel() -> None:
    features = torch.zeros(2, 1, 8, 8)
    with pytest.raises(DatasetError, match="one label per voxel"):
        LocalDataset(
            features, torch.zeros(2, 8, 4, dtype=torch.int64), 2, "MR", task="segmentation"
        )
    with pytest.raises(DatasetError, match="one label per voxel"):
        LocalDataset(features, torch.zeros(2, dtype=torch.int64), 2, "MR", task="segmentation")
    with pytest.raises(DatasetError, match=r"\[0, 2\)"):
        LocalDataset(features, torch.full((2, 8, 8), 2), 2, "MR", task="segmentation")
    with pytest.raises(DatasetError, match="1-D"):
        LocalDataset(features, torch.zeros(2, 8, 8, dtype=torch.int64), 2, "MR")


def test_synthetic_volumes_are_deterministic_and_count_records_not_voxels() -> None:
    train, test = synthetic_volumes_site(1, 3, 7, n_samples=12, image_size=16)
    again, _ = synthetic_volumes_site(1, 3, 7, n_samples=12, image_size=16)
    assert torch.equal(train.features, again.features)
    assert torch.equal(train.labels, again.labels)
    assert train.task == test.task == "segmentation"
    assert train.input_shape == (1, 16, 16, 16)
    assert len(train) + len(test) == 12
    summary = train.summary()
    assert summary["task"] == "segmentation"
    # Records in which each class occurs: every volume has background and a sphere.
    assert summary["label_counts"] == {"background": len(train), "sphere": len(train)}


def test_training_refuses_a_dataset_of_another_task() -> None:
    train, _ = synthetic_volumes_site(0, 3, 7, n_samples=10, image_size=16)
    model = build_model(SMALL_UNET, input_shape=train.input_shape, num_classes=2)
    with pytest.raises(IncompatibleInputError, match="labelled for segmentation"):
        train_round(model, train, TrainingSpec(rounds=1), dp=None)  # classification


@pytest.mark.parametrize(
    ("model", "task"),
    [("unet", "classification"), ("densenet121", "segmentation"), ("tabular-mlp", "segmentation")],
)
def test_a_model_of_another_task_is_refused(model: str, task: str) -> None:
    with pytest.raises(IncompatibleInputError, match=f"task is {task}") as info:
        check_task(ModelSpec(name=model, version="1"), TaskSpec(kind=task))  # type: ignore[arg-type]
    assert info.value.code == "model.incompatible_input"


def test_a_small_unet_learns_the_synthetic_spheres_beyond_the_trivial_baseline() -> None:
    train, _ = synthetic_volumes_site(0, 3, 7, n_samples=24, image_size=32)
    holdout = synthetic_volumes_holdout(n_samples=8, image_size=32)
    model = build_model(SMALL_UNET, input_shape=train.input_shape, num_classes=2, seed=0)
    trivial = evaluate(model, holdout)  # untrained: near-chance masks
    training = TrainingSpec(
        rounds=1, local_epochs=5, batch_size=4, learning_rate=0.01, optimizer="adam"
    )
    train_round(model, train, training, dp=None, seed=0, task=SEGMENTATION)
    trained = evaluate(model, holdout)
    # All-background scores Dice 0 here: every holdout volume has a sphere.
    assert trained.dice > 0.6 > trivial.dice
    assert trained.hd95 < trivial.hd95
    assert math.isnan(trained.accuracy)
    assert trained.metrics(SEGMENTATION) == {"dice": trained.dice, "hd95": trained.hd95}


def test_dp_training_and_the_noisy_release_of_a_segmentation_round() -> None:
    train, test = synthetic_volumes_site(2, 3, 7, n_samples=16, image_size=16)
    model = build_model(SMALL_UNET, input_shape=train.input_shape, num_classes=2)
    training = TrainingSpec(rounds=1, batch_size=4, learning_rate=0.01, optimizer="adam")
    dp = DpTrainer(
        PrivacySpec(epsilon=50.0, delta=1e-3),
        training,
        num_samples=len(train),
        noise_multiplier=1.0,
    )
    result = train_round(model, train, training, dp=dp, seed=0, task=SEGMENTATION)
    assert result.steps > 0
    assert result.epsilon_spent is not None
    assert result.epsilon_spent > 0
    released = noisy_histogram(model, test, bins=4, noise=1e-9)
    assert len(released.counts) == 4 * len(HD95_EDGES)
    assert sum(released.counts) == pytest.approx(len(test))
    from_release = metrics(released.counts, num_classes=2, bins=4, task="segmentation")
    exact = evaluate(model, test)
    assert abs(from_release["dice"] - exact.dice) <= 0.125 + 1e-6  # half a bin


def test_the_centralised_baseline_of_a_segmentation_study_reports_dice() -> None:
    parts = [synthetic_volumes_site(i, 3, 7, n_samples=10, image_size=16)[0] for i in range(3)]
    holdout = synthetic_volumes_holdout(n_samples=4, image_size=16)
    training = TrainingSpec(rounds=1, batch_size=4, learning_rate=0.01, optimizer="adam")
    result = centralised_baseline(parts, holdout, SMALL_UNET, training)
    assert result.num_train_samples == sum(len(p) for p in parts)
    assert 0.0 <= result.metrics.dice <= 1.0
    assert math.isnan(result.metrics.auc)
