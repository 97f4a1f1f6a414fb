"""Declared preprocessing: the allow-listed image transforms a study contract may name.

Why it is declarative: no researcher code runs at a hospital, and preprocessing shapes
every record a site trains on, so it is part of what each steward approves (inside the
contract hash) and part of the privacy guarantee. Every step here is a fixed transform
whose parameters are *values the researcher declares*; none reads a statistic of the data
(no mean/std normalisation, no percentiles, no crop to the foreground the image shows):
an input that depended on other patients' values would carry them into the model, outside
DP-SGD's per-record accounting. See ``docs/privacy.md``.

The steps, applied in order to the image and (segmentation) its label map alike, labels
always with nearest-neighbour interpolation so a label value stays a declared class:

* ``orientation``: reorient to ``axcodes`` (e.g. ``RAS``) using the file's affine;
* ``spacing``: resample to ``pixdim`` (mm per axis); ``mode`` for the image;
* ``scale_intensity_range``: map ``[a_min, a_max]`` linearly to ``[b_min, b_max]``
  (``clip`` to it), e.g. a CT window;
* ``crop_or_pad``: centre-crop or zero-pad to ``spatial_size``;
* ``resize``: resample to ``spatial_size``; ``mode`` for the image.

The site turns a spec into MONAI dictionary transforms (:mod:`site_node.data.preprocess`);
the server builds nothing and reads only :meth:`PreprocessingSpec.output_spatial_shape`,
the input size every site's records have when the last step that changes the spatial
shape fixes it (:func:`consortium_server.datasets.service.model_input`). This module
imports neither role (pydantic only).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from concord_protocol.canonical import sha256_hex

__all__ = [
    "ALLOWED_STEPS",
    "MAX_VOXELS",
    "CropOrPadStep",
    "OrientationStep",
    "PreprocessingSpec",
    "PreprocessingStep",
    "ResizeStep",
    "ScaleIntensityRangeStep",
    "SpacingStep",
]

#: The allow-list, in the order the docs describe them. Nothing else parses.
ALLOWED_STEPS = ("orientation", "spacing", "scale_intensity_range", "crop_or_pad", "resize")

#: The most voxels one record may have after a size-setting step (256^3): a bound on what
#: a contract can make each site allocate per record.
MAX_VOXELS = 256**3

#: Spatial axes: a step's per-axis parameters have 2 (images) or 3 (volumes) entries.
_MIN_RANK, _MAX_RANK = 2, 3

Side = Annotated[int, Field(ge=1, le=1024)]
Millimetres = Annotated[float, Field(ge=0.01, le=100.0)]
#: Intensities a declared window may name (CT Hounsfield units, MR and PET scales fit).
Intensity = Annotated[float, Field(ge=-1e6, le=1e6)]
Target = Annotated[float, Field(ge=-1e3, le=1e3)]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def rank(self) -> int | None:
        """Number of spatial axes the step's parameters name (None: any)."""
        return None


class OrientationStep(_Step):
    """Reorient to ``axcodes`` (each axis named once: L/R, A/P, S/I), from the affine."""

    op: Literal["orientation"]
    axcodes: Annotated[str, Field(pattern=r"^[LRAPSI]{2,3}$")] = Field(
        description="Target orientation, e.g. `RAS` (3D) or `RA` (2D)."
    )

    @field_validator("axcodes")
    @classmethod
    def _each_axis_once(cls, value: str) -> str:
        axes = [{"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}[c] for c in value]
        if len(set(axes)) != len(axes):
            raise ValueError(f"axcodes {value!r} names an axis twice (one of L/R, A/P, S/I each)")
        return value

    @property
    def rank(self) -> int | None:
        return len(self.axcodes)


class SpacingStep(_Step):
    """Resample to ``pixdim`` millimetres per axis; the label map with nearest neighbour."""

    op: Literal["spacing"]
    pixdim: tuple[Millimetres, ...] = Field(
        min_length=_MIN_RANK, max_length=_MAX_RANK, description="Voxel size per axis, mm."
    )
    mode: Literal["linear", "nearest"] = Field(
        default="linear", description="Image interpolation (labels: always nearest)."
    )

    @property
    def rank(self) -> int | None:
        return len(self.pixdim)


class ScaleIntensityRangeStep(_Step):
    """Map the declared window ``[a_min, a_max]`` to ``[b_min, b_max]``; image only.

    The window is a declared value (a CT window in Hounsfield units, a scanner's scale),
    never computed from these patients' intensities."""

    op: Literal["scale_intensity_range"]
    a_min: Intensity
    a_max: Intensity
    b_min: Target = 0.0
    b_max: Target = 1.0
    clip: bool = Field(default=True, description="Clip to [b_min, b_max] after mapping.")

    @model_validator(mode="after")
    def _ordered(self) -> ScaleIntensityRangeStep:
        if not self.a_min < self.a_max:
            raise ValueError("a_min must be smaller than a_max")
        if not self.b_min < self.b_max:
            raise ValueError("b_min must be smaller than b_max")
        return self


class _SizedStep(_Step):
    """A step that makes every record ``spatial_size`` voxels (at most :data:`MAX_VOXELS`)."""

    spatial_size: tuple[Side, ...] = Field(min_length=_MIN_RANK, max_length=_MAX_RANK)

    @field_validator("spatial_size")
    @classmethod
    def _bounded(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        voxels = 1
        for side in value:
            voxels *= side
        if voxels > MAX_VOXELS:
            raise ValueError(f"spatial_size has {voxels} voxels; at most {MAX_VOXELS} per record")
        return value

    @property
    def rank(self) -> int | None:
        return len(self.spatial_size)


class CropOrPadStep(_SizedStep):
    """Centre-crop or zero-pad each axis to ``spatial_size``."""

    op: Literal["crop_or_pad"]


class ResizeStep(_SizedStep):
    """Resample to ``spatial_size`` voxels; the label map with nearest neighbour."""

    op: Literal["resize"]
    mode: Literal["linear", "area", "nearest"] = Field(
        default="linear",
        description="Image interpolation: `linear` (bi/trilinear), `area` or `nearest` "
        "(labels: always nearest).",
    )


PreprocessingStep = Annotated[
    OrientationStep | SpacingStep | ScaleIntensityRangeStep | CropOrPadStep | ResizeStep,
    Field(discriminator="op"),
]

#: Steps whose output spatial shape depends on the input (orientation permutes the axes,
#: spacing resamples by the file's voxel size) or fixes it.
_SHAPE_STEPS = (OrientationStep, SpacingStep, CropOrPadStep, ResizeStep)


class PreprocessingSpec(BaseModel):
    """An ordered list of allow-listed steps (empty: the dataset's own loading only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: tuple[PreprocessingStep, ...] = Field(
        default=(),
        max_length=16,
        description="Applied in order, to the image and its label map alike.",
    )

    @model_validator(mode="after")
    def _one_rank(self) -> PreprocessingSpec:
        """Every per-axis parameter names the same number of spatial axes."""
        ranks = {step.rank for step in self.steps if step.rank is not None}
        if len(ranks) > 1:
            raise ValueError(
                "steps name different numbers of spatial axes "
                f"({', '.join(str(r) for r in sorted(ranks))}): give every per-axis "
                "parameter (axcodes, pixdim, spatial_size) for the same axes"
            )
        return self

    @property
    def spatial_rank(self) -> int | None:
        """Spatial axes the steps are declared for (None when no step names any)."""
        return next((step.rank for step in self.steps if step.rank is not None), None)

    def output_spatial_shape(self) -> tuple[int, ...] | None:
        """The spatial shape of every preprocessed record, when the last step that changes
        the spatial shape fixes it (``crop_or_pad`` or ``resize``); ``None`` when it
        depends on the input (``orientation``, ``spacing`` last) or no step changes it."""
        for step in reversed(self.steps):
            if isinstance(step, CropOrPadStep | ResizeStep):
                return tuple(step.spatial_size)
            if isinstance(step, _SHAPE_STEPS):
                return None
        return None

    def describe(self) -> str:
        """One line a steward reads: each step with its parameters, in order."""
        if not self.steps:
            return "none"
        parts = []
        for step in self.steps:
            params = step.model_dump(mode="json", exclude={"op"})
            shown = ", ".join(
                f"{k}={'x'.join(str(v) for v in value) if isinstance(value, list) else value}"
                for k, value in params.items()
            )
            parts.append(f"{step.op}({shown})")
        return " > ".join(parts)

    def digest(self) -> str:
        """SHA-256 of the spec's canonical JSON (what a cached record was made with)."""
        return sha256_hex(self.model_dump(mode="json"))
