"""Dataset configurations registered by hospital IT, and the one entry point that loads them.

A :class:`DatasetConfig` says where the data is and how to read it; it holds no data.
:func:`load_dataset` turns it into a :class:`LocalDataset` for the train or test split. The
split is a keyed hash of each record's id (``seed`` picks the key), so the train and test
splits loaded in separate calls (or processes) never overlap, and one record never moves
another. File kinds need the task's ``classes`` (a Decathlon dataset declares them in its
``dataset.json``), and CSV datasets their features' declared ranges: preprocessing reads no
statistic of the data (see ``docs/privacy.md``).

A study's declared preprocessing (``preprocessing``, from its contract) is applied by the
kinds that can (:data:`PREPROCESSING_KINDS`: ``decathlon``, and ``nifti``/``dicom`` in
``volume_mode: volume``); any other kind refuses it (``data.preprocessing_unsupported``)
rather than train on inputs other than the stewards approved.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from concord_protocol.preprocessing import PreprocessingSpec
from site_node.data.cache import RecordCache
from site_node.data.csv_loader import FeatureRange, load_csv, read_ranges_file
from site_node.data.dataset import LocalDataset, Split
from site_node.data.decathlon import load_decathlon
from site_node.data.demo import (
    breast_cancer_site,
    synthetic_images_site,
    synthetic_volumes_site,
)
from site_node.data.image_folder import load_image_folder
from site_node.data.volumes import load_volumes
from site_node.errors import DatasetConfigError, PreprocessingError

__all__ = ["PREPROCESSING_KINDS", "DatasetConfig", "DatasetKind", "LocalDataset", "load_dataset"]

DatasetKind = Literal[
    "csv",
    "image_folder",
    "nifti",
    "dicom",
    "decathlon",
    "demo_breast_cancer",
    "demo_synthetic_images",
    "demo_synthetic_volumes",
]
_FILE_KINDS = frozenset({"csv", "image_folder", "nifti", "dicom", "decathlon"})
#: Kinds that apply a study's declared preprocessing (nifti/dicom in volume mode only).
PREPROCESSING_KINDS = frozenset({"decathlon", "nifti", "dicom"})

Slug = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", strip_whitespace=True)
]


class DatasetConfig(BaseModel):
    """How to read one local dataset (metadata only; never sent anywhere as is).

    File kinds (``csv``, ``image_folder``, ``nifti``, ``dicom``, ``decathlon``) need
    ``path``: the CSV file, the folder holding the images/volumes (DICOM: files or series
    folders) and their ``labels_file``, or a Decathlon folder with its ``dataset.json``
    (which declares the classes: ``classes`` is refused there). Demo kinds need
    ``site_index`` and take no ``path``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Slug = Field(description="Catalogue id of the dataset, e.g. `bc-tabular`.")
    kind: DatasetKind
    path: Path | None = Field(default=None, description="CSV file or dataset folder.")
    description: str = Field(default="", max_length=2000)
    modality: str | None = Field(
        default=None, max_length=40, description="e.g. `CT`, `MR`, `mammography`."
    )
    label_column: str = Field(default="label", min_length=1, description="CSV label column.")
    exclude_columns: tuple[str, ...] = Field(
        default=(), description="CSV columns that are not features (e.g. a record id)."
    )
    id_column: str | None = Field(
        default=None,
        min_length=1,
        description="CSV column holding a unique record id: the key of the train/test hash "
        "(without it, a record's own cells are).",
    )
    feature_ranges: dict[str, tuple[float, float]] | None = Field(
        default=None,
        description="CSV: declared plausible [low, high] per feature column (a data "
        "dictionary, never computed from the data); values are clipped to it and mapped "
        "to [-1, 1].",
    )
    feature_ranges_file: Path | None = Field(
        default=None, description="CSV: the declared ranges as a `column,low,high` CSV file."
    )
    scaling: Literal["declared_ranges", "none"] = Field(
        default="declared_ranges",
        description="CSV: scale features to their declared ranges, or leave them as they are.",
    )
    labels_file: str = Field(
        default="labels.csv", min_length=1, description="`filename,label` index in the folder."
    )
    classes: tuple[str, ...] | None = Field(
        default=None,
        min_length=2,
        description="Fixed class order (index = position); labels outside it are refused.",
    )
    image_size: int = Field(default=64, ge=8, le=512, description="Side of resized images.")
    volume_mode: Literal["central_slice", "volume"] = Field(
        default="central_slice", description="NIfTI/DICOM: middle axial slice, or whole volume."
    )
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = Field(default=7, ge=0, description="Seed of the train/test split (and demos).")
    site_index: int | None = Field(default=None, ge=0, description="Demo kinds: this site.")
    n_sites: int = Field(default=3, ge=1, le=8, description="Demo kinds: sites in the demo.")
    n_samples: int = Field(default=256, ge=10, le=100_000, description="Synthetic images.")

    @model_validator(mode="after")
    def _kind_fields(self) -> DatasetConfig:
        if self.kind == "decathlon":
            if self.path is None:
                raise ValueError("kind 'decathlon' needs `path`: the folder of dataset.json")
            if self.classes is not None:
                raise ValueError(
                    "kind 'decathlon' takes its classes from dataset.json's `labels`: "
                    "leave `classes` out"
                )
        elif self.kind in _FILE_KINDS:
            if self.path is None:
                raise ValueError(f"kind {self.kind!r} needs `path`")
            if self.classes is None:
                raise ValueError(
                    f"kind {self.kind!r} needs `classes`: the task's class set comes from "
                    "configuration, not from the labels present"
                )
        else:
            if self.path is not None:
                raise ValueError(f"kind {self.kind!r} takes no `path`")
            if self.site_index is None:
                raise ValueError(f"kind {self.kind!r} needs `site_index`")
            if self.site_index >= self.n_sites:
                raise ValueError("`site_index` must be smaller than `n_sites`")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("`classes` has duplicates")
        if self.kind != "csv" and (
            self.feature_ranges is not None
            or self.feature_ranges_file is not None
            or self.id_column is not None
        ):
            raise ValueError(
                "`feature_ranges`, `feature_ranges_file` and `id_column` are for CSV datasets"
            )
        if self.feature_ranges is not None and self.feature_ranges_file is not None:
            raise ValueError("give `feature_ranges` or `feature_ranges_file`, not both")
        for column, (low, high) in (self.feature_ranges or {}).items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"feature range of {column!r} needs finite low < high")
        return self

    def declared_ranges(self) -> dict[str, FeatureRange] | None:
        """The CSV features' declared ranges, from the configuration or its ranges file."""
        if self.feature_ranges_file is not None:
            return read_ranges_file(self.feature_ranges_file)
        return dict(self.feature_ranges) if self.feature_ranges is not None else None


def load_dataset(
    config: DatasetConfig,
    *,
    split: Split,
    preprocessing: PreprocessingSpec | None = None,
    cache: RecordCache | None = None,
) -> LocalDataset:
    """Load the ``split`` ("train" or "test") of a configured dataset, with a study's
    declared ``preprocessing`` (the volume kinds; see the module docstring), through
    ``cache`` when given (the volume kinds).

    Raises:
        DatasetError: or one of its subclasses, with a message naming the file, column or
            line at fault (never a value).
        PreprocessingError: ``preprocessing`` has steps and the kind cannot apply them
            (``data.preprocessing_unsupported``), or they do not fit the data.
    """
    if split not in ("train", "test"):
        raise DatasetConfigError(f"split must be 'train' or 'test', got {split!r}")
    if preprocessing is not None and preprocessing.steps and config.kind not in PREPROCESSING_KINDS:
        raise PreprocessingError(
            f"dataset {config.id!r} ({config.kind}) cannot apply the study's declared "
            "preprocessing: only decathlon datasets and nifti/dicom volumes can",
            code="data.preprocessing_unsupported",
        )
    classes = list(config.classes or ())
    dataset: LocalDataset
    if config.kind == "csv":
        assert config.path is not None
        dataset = load_csv(
            config.path,
            label_column=config.label_column,
            exclude_columns=config.exclude_columns,
            id_column=config.id_column,
            feature_ranges=config.declared_ranges(),
            scaling=config.scaling,
            classes=classes,
            split=split,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    elif config.kind == "image_folder":
        assert config.path is not None
        dataset = load_image_folder(
            config.path,
            labels_file=config.labels_file,
            image_size=config.image_size,
            classes=classes,
            modality=config.modality or "image",
            split=split,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    elif config.kind in ("nifti", "dicom"):
        assert config.path is not None
        dataset = load_volumes(
            config.path,
            fmt="nifti" if config.kind == "nifti" else "dicom",
            labels_file=config.labels_file,
            image_size=config.image_size,
            volume_mode=config.volume_mode,
            classes=classes,
            modality=config.modality,
            split=split,
            test_fraction=config.test_fraction,
            seed=config.seed,
            preprocessing=preprocessing,
            cache=cache,
        )
    elif config.kind == "decathlon":
        assert config.path is not None
        dataset = load_decathlon(
            config.path,
            split=split,
            test_fraction=config.test_fraction,
            seed=config.seed,
            image_size=config.image_size,
            preprocessing=preprocessing,
            cache=cache,
            modality=config.modality,
        )
    else:
        assert config.site_index is not None
        if config.kind == "demo_breast_cancer":
            pair = breast_cancer_site(config.site_index, config.n_sites, config.seed)
        elif config.kind == "demo_synthetic_volumes":
            pair = synthetic_volumes_site(
                config.site_index,
                config.n_sites,
                config.seed,
                n_samples=config.n_samples,
                image_size=config.image_size,
            )
        else:
            pair = synthetic_images_site(
                config.site_index,
                config.n_sites,
                config.seed,
                n_samples=config.n_samples,
                image_size=config.image_size,
            )
        dataset = pair[0] if split == "train" else pair[1]
        if config.modality:
            dataset = replace(dataset, modality=config.modality)
    return replace(dataset, dataset_id=config.id)
