"""Declared preprocessing: only allow-listed steps, typed and bounded parameters, and the
output size the server sizes the model from."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from concord_protocol.preprocessing import ALLOWED_STEPS, MAX_VOXELS, PreprocessingSpec


def spec(*steps: dict[str, Any]) -> PreprocessingSpec:
    return PreprocessingSpec.model_validate({"steps": list(steps)})


def test_every_allowed_step_parses_with_its_defaults() -> None:
    parsed = spec(
        {"op": "orientation", "axcodes": "RAS"},
        {"op": "spacing", "pixdim": [1, 1, 2.5]},
        {"op": "scale_intensity_range", "a_min": -1000, "a_max": 400},
        {"op": "crop_or_pad", "spatial_size": [96, 96, 64]},
        {"op": "resize", "spatial_size": [32, 32, 32]},
    )
    assert tuple(s.op for s in parsed.steps) == ALLOWED_STEPS
    dumped = parsed.model_dump(mode="json")["steps"]
    assert dumped[1] == {"op": "spacing", "pixdim": [1.0, 1.0, 2.5], "mode": "linear"}
    assert (dumped[2]["b_min"], dumped[2]["b_max"], dumped[2]["clip"]) == (0.0, 1.0, True)
    assert parsed.spatial_rank == 3
    assert PreprocessingSpec.model_validate(parsed.model_dump(mode="json")) == parsed


@pytest.mark.parametrize(
    "step",
    [
        {"op": "normalize_intensity"},  # mean/std read from the data: not allowed
        {"op": "normalize_intensity", "subtrahend": 0, "divisor": 1},
        {"op": "scale_intensity_range_percentiles", "lower": 1, "upper": 99},
        {"op": "crop_foreground"},
        {"op": "lambda", "func": "lambda x: x"},
        {"axcodes": "RAS"},
    ],
    ids=["normalize", "normalize-declared", "percentiles", "crop-foreground", "code", "no-op"],
)
def test_a_step_outside_the_allow_list_is_refused(step: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="op"):
        spec(step)


@pytest.mark.parametrize(
    "step",
    [
        {"op": "orientation", "axcodes": "RLS"},  # an axis twice
        {"op": "orientation", "axcodes": "RASX"},
        {"op": "orientation", "axcodes": "R"},
        {"op": "spacing", "pixdim": [0.0, 1.0, 1.0]},
        {"op": "spacing", "pixdim": [1.0, 1.0, 500.0]},
        {"op": "spacing", "pixdim": [1.0]},
        {"op": "spacing", "pixdim": [1.0, 1.0, 1.0], "mode": "bicubic"},
        {"op": "scale_intensity_range", "a_min": 400, "a_max": -1000},
        {"op": "scale_intensity_range", "a_min": 0, "a_max": 1, "b_min": 1, "b_max": 1},
        {"op": "scale_intensity_range", "a_min": 0, "a_max": 1e9},
        {"op": "scale_intensity_range", "a_min": 0, "a_max": float("nan")},
        {"op": "scale_intensity_range", "a_max": 1},
        {"op": "crop_or_pad", "spatial_size": [0, 8, 8]},
        {"op": "crop_or_pad", "spatial_size": [8, 8, 8, 8]},
        {"op": "resize", "spatial_size": [2048, 8, 8]},
        {"op": "resize", "spatial_size": [512, 512, 512]},  # over MAX_VOXELS
        {"op": "resize", "spatial_size": [8, 8], "mode": "bicubic"},
        {"op": "resize", "spatial_size": [8, 8], "extra": 1},
    ],
)
def test_out_of_range_or_unknown_parameters_are_refused(step: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        spec(step)


def test_per_axis_parameters_must_name_the_same_axes() -> None:
    with pytest.raises(ValidationError, match="different numbers of spatial axes"):
        spec({"op": "orientation", "axcodes": "RAS"}, {"op": "resize", "spatial_size": [8, 8]})
    assert spec({"op": "resize", "spatial_size": [8, 8]}).spatial_rank == 2
    assert spec({"op": "scale_intensity_range", "a_min": 0, "a_max": 1}).spatial_rank is None


@pytest.mark.parametrize(
    ("steps", "shape"),
    [
        ([], None),
        ([{"op": "scale_intensity_range", "a_min": 0, "a_max": 1}], None),
        ([{"op": "resize", "spatial_size": [32, 32, 16]}], (32, 32, 16)),
        (
            [
                {"op": "resize", "spatial_size": [32, 32, 32]},
                {"op": "crop_or_pad", "spatial_size": [24, 24, 24]},
                {"op": "scale_intensity_range", "a_min": 0, "a_max": 1},
            ],
            (24, 24, 24),
        ),
        (
            [
                {"op": "resize", "spatial_size": [32, 32, 32]},
                {"op": "spacing", "pixdim": [1, 1, 1]},
            ],
            None,  # the last shape-changing step depends on the file's voxel size
        ),
        (
            [
                {"op": "crop_or_pad", "spatial_size": [32, 32, 16]},
                {"op": "orientation", "axcodes": "RAS"},
            ],
            None,  # orientation after it may permute the axes
        ),
    ],
)
def test_the_output_size_is_fixed_only_by_a_last_crop_or_resize(
    steps: list[dict[str, Any]], shape: tuple[int, ...] | None
) -> None:
    assert spec(*steps).output_spatial_shape() == shape


def test_a_steward_reads_every_step_with_its_parameters() -> None:
    described = spec(
        {"op": "orientation", "axcodes": "RAS"},
        {"op": "scale_intensity_range", "a_min": -1000, "a_max": 400},
        {"op": "resize", "spatial_size": [32, 32, 16], "mode": "area"},
    ).describe()
    assert described == (
        "orientation(axcodes=RAS) > scale_intensity_range(a_min=-1000.0, a_max=400.0, "
        "b_min=0.0, b_max=1.0, clip=True) > resize(spatial_size=32x32x16, mode=area)"
    )
    assert PreprocessingSpec().describe() == "none"


def test_the_digest_is_of_the_canonical_form() -> None:
    a = spec({"op": "resize", "spatial_size": [8, 8, 8]})
    b = spec({"spatial_size": [8, 8, 8], "mode": "linear", "op": "resize"})
    assert a.digest() == b.digest()
    assert a.digest() != spec({"op": "resize", "spatial_size": [8, 8, 9]}).digest()
    assert MAX_VOXELS == 256**3
