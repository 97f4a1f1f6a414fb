"""Segmentation at the site: the training losses and each record's Dice and HD95.

A segmentation study (``task.kind: segmentation`` in the contract) labels every voxel,
class 0 being the background. The network outputs one logit per class and voxel; training
minimises MONAI's Dice or Dice plus cross-entropy loss on the softmax; evaluation scores
each record by:

* **Dice**: the mean over foreground classes of MONAI's ``compute_dice`` between the
  predicted (argmax) and true masks. A class absent from both counts 1 (the model rightly
  predicted nothing), absent from one only counts 0.
* **HD95**: the mean over foreground classes of MONAI's 95th-percentile Hausdorff distance,
  in voxels. A class absent from both counts 0; absent from one only counts the image's
  diagonal, the farthest two voxels can be.

Every record so has a defined, bounded score: what the DP evaluation bins
(:mod:`concord_protocol.eval_histograms`) needs, one record in one cell.

The losses average per-record losses (``batch=False``; the cross-entropy is the mean over
equally many voxels per record), so a batch's loss is the mean of its records' losses:
what Opacus' per-sample gradients assume (``loss_reduction="mean"``). Set a loss's
``reduction`` to ``"none"`` and it returns each record's loss instead, shape ``(B,)``: what
Opacus' ghost clipping (``DPLossFastGradientClipping``) asks its criterion for.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from torch import nn
from torch.nn import functional

from concord_protocol.contract import TaskSpec

__all__ = ["per_record_scores", "segmentation_loss"]


def segmentation_loss(task: TaskSpec) -> nn.Module:
    """The contract's segmentation loss over ``(logits (B, K, ...), labels (B, ...))``: the
    mean of the records' losses, or each record's with ``reduction = "none"``."""
    return _PerRecordLoss(with_cross_entropy=task.loss == "dice_ce")


class _PerRecordLoss(nn.Module):
    """MONAI's Dice loss per record (mean over classes), plus the record's mean voxel
    cross-entropy for ``dice_ce`` (MONAI's ``DiceCELoss`` with both weights 1, which has no
    per-record reduction of its own), then the batch mean unless ``reduction`` is
    ``"none"``."""

    def __init__(self, *, with_cross_entropy: bool) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, batch=False, reduction="none")
        self.with_cross_entropy = with_cross_entropy
        #: ``"mean"`` (the batch's loss) or ``"none"`` (each record's), as in torch's losses.
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        each = self.dice(logits, labels.unsqueeze(1)).flatten(1).mean(dim=1)
        if self.with_cross_entropy:
            voxels = functional.cross_entropy(logits, labels, reduction="none")
            each = each + voxels.flatten(1).mean(dim=1)
        return each if self.reduction == "none" else each.mean()


def per_record_scores(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each record's (Dice, HD95) from ``logits`` (N, K, *spatial) and ``labels`` (N,
    *spatial), as the module docstring defines them."""
    if logits.ndim < 4 or logits.shape[1] != num_classes:
        raise ValueError(f"logits {tuple(logits.shape)} are not (N, {num_classes}, *spatial)")
    predicted = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
    truth = one_hot(labels.unsqueeze(1), num_classes)
    with warnings.catch_warnings():
        # MONAI warns on empty masks and on a deprecated argument of its own helpers;
        # empty masks are handled below.
        warnings.simplefilter("ignore")
        dice = compute_dice(predicted, truth, include_background=False, ignore_empty=False)
        hd95 = compute_hausdorff_distance(predicted, truth, include_background=False, percentile=95)
    pred_any = predicted[:, 1:].flatten(2).any(dim=2)
    true_any = truth[:, 1:].flatten(2).any(dim=2)
    diagonal = math.sqrt(sum((side - 1) ** 2 for side in labels.shape[1:]))
    hd95 = torch.where(pred_any & true_any, hd95, torch.where(pred_any | true_any, diagonal, 0.0))
    hd95 = torch.nan_to_num(hd95, nan=diagonal, posinf=diagonal)
    return (
        dice.double().mean(dim=1).numpy(),
        hd95.double().clamp(0.0, diagonal).mean(dim=1).numpy(),
    )
