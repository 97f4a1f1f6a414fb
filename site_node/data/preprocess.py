"""A study's declared preprocessing as MONAI dictionary transforms, image and label alike.

The contract names allow-listed steps with declared parameters
(:class:`concord_protocol.preprocessing.PreprocessingSpec`); this module maps each one to
the MONAI transform that does exactly that and nothing else:

==========================  ==========================================================
``orientation``             ``Orientationd(axcodes)``, image and label
``spacing``                 ``Spacingd(pixdim)``: image with the declared mode, label nearest
``scale_intensity_range``   ``ScaleIntensityRanged(a_min, a_max, b_min, b_max, clip)``, image
``crop_or_pad``             ``ResizeWithPadOrCropd(spatial_size)``, image and label
``resize``                  ``Resized(spatial_size)``: image with the declared mode, label
                            nearest
==========================  ==========================================================

None of them reads a statistic of the data: orientation and spacing read the record's own
affine (where the voxels are, not what they hold), the rest only declared values. Labels
are always resampled with nearest neighbour, so every label value after preprocessing is
one the file held (a declared class), never a blend of two.

The loaders (:mod:`site_node.data.decathlon`, :mod:`site_node.data.volumes`) call
:func:`apply_preprocessing` on each record they read; what they do when the contract
declares nothing (their configured ``image_size`` and per-record scaling) is theirs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from concord_protocol.preprocessing import (
    CropOrPadStep,
    OrientationStep,
    PreprocessingSpec,
    PreprocessingStep,
    ResizeStep,
    ScaleIntensityRangeStep,
    SpacingStep,
)
from site_node.errors import PreprocessingError

__all__ = [
    "IMAGE",
    "LABEL",
    "apply_preprocessing",
    "check_rank",
    "resize_to",
    "step_transform",
]

#: The dictionary keys of a record: the image and (segmentation) its label map.
IMAGE, LABEL = "image", "label"


def _image_mode(mode: Literal["linear", "area", "nearest"], rank: int) -> str:
    """MONAI's name of an image interpolation for ``rank`` spatial axes."""
    if mode == "linear":
        return "bilinear" if rank == 2 else "trilinear"
    return mode


def step_transform(step: PreprocessingStep, *, keys: tuple[str, ...], rank: int) -> MapTransform:
    """The MONAI dictionary transform of one declared step over ``keys`` (the image first,
    then the label map if any: labels get nearest-neighbour interpolation)."""
    labels = keys[1:]
    if isinstance(step, OrientationStep):
        # labels=None: the axcodes are read in the space the reader recorded (RAS here).
        return Orientationd(keys=keys, axcodes=step.axcodes, labels=None)
    if isinstance(step, SpacingStep):
        mode = "bilinear" if step.mode == "linear" else "nearest"  # MONAI: bilinear in 3D too
        return Spacingd(keys=keys, pixdim=step.pixdim, mode=(mode, *("nearest",) * len(labels)))
    if isinstance(step, ScaleIntensityRangeStep):
        return ScaleIntensityRanged(
            keys=keys[:1],
            a_min=step.a_min,
            a_max=step.a_max,
            b_min=step.b_min,
            b_max=step.b_max,
            clip=step.clip,
        )
    if isinstance(step, CropOrPadStep):
        return ResizeWithPadOrCropd(keys=keys, spatial_size=step.spatial_size)
    if isinstance(step, ResizeStep):
        return resize_to(step.spatial_size, keys=keys, mode=_image_mode(step.mode, rank))
    raise AssertionError(f"unhandled preprocessing step {step!r}")  # the union is closed


def resize_to(size: tuple[int, ...], *, keys: tuple[str, ...], mode: str) -> MapTransform:
    """Resample ``keys`` to ``size`` voxels: the image with ``mode``, labels nearest."""
    return Resized(keys=keys, spatial_size=size, mode=(mode, *("nearest",) * (len(keys) - 1)))


def check_rank(spec: PreprocessingSpec, rank: int, *, name: str) -> None:
    """Refuse steps declared for other spatial axes than the record ``name`` has."""
    if spec.spatial_rank is not None and spec.spatial_rank != rank:
        raise PreprocessingError(
            f"{name!r} has {rank} spatial axes; the study's preprocessing is declared for "
            f"{spec.spatial_rank}",
            hint="the study's datasets must all be 2D or all 3D as its preprocessing says",
        )


def apply_preprocessing(
    record: Mapping[str, torch.Tensor],
    spec: PreprocessingSpec,
    *,
    name: str,
    fallback_size: int | None = None,
) -> dict[str, Any]:
    """``spec`` applied to a channel-first ``record`` (``image``, optionally ``label``).

    The image should be a MONAI ``MetaTensor`` carrying its affine (orientation and spacing
    read it). When no step fixes the output size and ``fallback_size`` is given, the record
    is then resized to that side on every axis (the dataset's own ``image_size``), so that
    records stack.

    Raises:
        PreprocessingError: the steps name other spatial axes than the record has.
    """
    rank = record[IMAGE].ndim - 1
    check_rank(spec, rank, name=name)
    keys = (IMAGE, LABEL) if LABEL in record else (IMAGE,)
    transforms = [step_transform(step, keys=keys, rank=rank) for step in spec.steps]
    if spec.output_spatial_shape() is None and fallback_size is not None:
        transforms.append(
            resize_to((fallback_size,) * rank, keys=keys, mode=_image_mode("linear", rank))
        )
    with warnings.catch_warnings():
        # MONAI warns about metadata it cannot use (a missing affine means identity).
        warnings.simplefilter("ignore", UserWarning)
        out: dict[str, Any] = Compose(transforms)(dict(record))
    return out
