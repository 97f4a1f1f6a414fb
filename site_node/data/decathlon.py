"""Medical Segmentation Decathlon datasets: ``dataset.json`` with NIfTI image/label pairs.

The layout imaging teams already have (http://medicaldecathlon.com)::

    Task01_BrainTumour/
      dataset.json        {"labels": {"0": "background", "1": "edema", ...},
                           "modality": {"0": "FLAIR", "1": "T1w", ...},
                           "training": [{"image": "./imagesTr/BRATS_001.nii.gz",
                                         "label": "./labelsTr/BRATS_001.nii.gz"}, ...]}
      imagesTr/  labelsTr/  imagesTs/

Only ``training`` is read (``test`` lists images without labels; the site's test split is
its own keyed-hash share of ``training``). ``labels`` defines the task: its keys must be
``0 .. K-1`` (0 the background), so ``num_classes`` is K and the class names are its
values, in that order; a label map holding any other value is refused, naming the file and
never the value. ``modality`` gives the channels (a multi-modal image is a 4D NIfTI, one
modality per volume); each image must have that many.

Each case is keyed by its **case id**, the image file's name without ``.nii``/``.nii.gz``
(``BRATS_001``): the train/test split is a keyed hash of it
(:func:`~site_node.data.dataset.assign_split`), so adding a case moves no other.

Each record is read with MONAI's ``LoadImaged`` (``NibabelReader``), made channel-first,
checked (image and label of one spatial shape, declared channels and label values), then:

* with the study's declared preprocessing (:mod:`site_node.data.preprocess`): its steps,
  image and label alike, then a resize to ``image_size`` on every axis only when no step
  fixes the size. Nothing else: no intensity scaling it does not declare;
* without: resized to ``image_size`` on every axis (image trilinear, label nearest) and
  each channel scaled to [0, 1] by its own range in that record (the loaders' default:
  it reads that record alone).

Records are cached (:class:`~site_node.data.cache.RecordCache`) by their two files and
that recipe.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.data import NibabelReader
from monai.transforms import EnsureChannelFirstd, LoadImaged, ScaleIntensity

from concord_protocol.preprocessing import PreprocessingSpec
from site_node.data._labels import index_file, inside_folder, plain_tensor
from site_node.data.cache import RecordCache
from site_node.data.dataset import LocalDataset, Split, assign_split, check_split_size
from site_node.data.preprocess import IMAGE, LABEL, apply_preprocessing
from site_node.errors import (
    DatasetError,
    DatasetIndexError,
    EmptyDatasetError,
    MissingFileError,
    ShapeMismatchError,
    UndeclaredLabelValueError,
    UnreadableFileError,
)

__all__ = ["DecathlonCase", "DecathlonIndex", "load_decathlon", "read_decathlon_index"]

INDEX_FILE = "dataset.json"
#: Version of how a record is made from its files (a new one invalidates cached records).
_RECIPE = "decathlon/v1"


@dataclass(frozen=True)
class DecathlonCase:
    """One training case: its id and its two files (resolved, inside the folder)."""

    case_id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DecathlonIndex:
    """What ``dataset.json`` declares: the labels (index = class), modalities, cases."""

    labels: tuple[str, ...]
    modalities: tuple[str, ...]
    cases: tuple[DecathlonCase, ...]


def _numbered(raw: object, field: str, *, minimum: int) -> tuple[str, ...]:
    """A ``{"0": name, "1": name, ...}`` mapping as its names in key order."""
    if not isinstance(raw, dict):
        raise DatasetIndexError(f"{INDEX_FILE}: {field!r} must map numbers to names")
    expected = [str(i) for i in range(len(raw))]
    if sorted(raw, key=lambda k: (len(k), k)) != expected:
        raise DatasetIndexError(
            f"{INDEX_FILE}: the keys of {field!r} must be 0 .. {len(raw) - 1}, each once",
            hint="Decathlon labels are numbered from 0 (the background) without gaps",
        )
    names = tuple(raw[k] for k in expected)
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise DatasetIndexError(f"{INDEX_FILE}: every entry of {field!r} needs a name")
    if len(names) < minimum:
        raise DatasetIndexError(f"{INDEX_FILE}: {field!r} needs at least {minimum} entries")
    return tuple(n.strip() for n in names)


def _case_id(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _inside(root: Path, raw: object, where: str) -> Path:
    """``raw`` as an existing file inside ``root`` (refused: not text, outside, missing)."""
    if not isinstance(raw, str) or not raw.strip():
        raise DatasetIndexError(f"{INDEX_FILE}: {where} must be a file path")
    target = inside_folder(root, raw.strip(), where=f"{INDEX_FILE}: {where}")
    if not target.is_file():
        raise MissingFileError(f"{INDEX_FILE}: {where}: {raw!r} is not a file")
    return target


def read_decathlon_index(root: Path) -> DecathlonIndex:
    """Parse and check ``root/dataset.json`` (no image is read).

    Raises:
        MissingFileError: the folder, ``dataset.json`` or a listed file is missing.
        DatasetIndexError: the index is not JSON, or a field is malformed (named).
        PathOutsideDatasetError: a listed path leads outside ``root``.
        DatasetError: two cases have the same case id (``data.duplicate_record``).
        EmptyDatasetError: ``training`` lists no case.
    """
    index = index_file(
        root,
        INDEX_FILE,
        described=INDEX_FILE,
        hint="a Decathlon dataset folder holds dataset.json, imagesTr/ and labelsTr/",
    )
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise DatasetIndexError(
            f"{INDEX_FILE} is not valid JSON" + (f" (line {line})" if line else "")
        ) from None
    if not isinstance(raw, dict):
        raise DatasetIndexError(f"{INDEX_FILE} must hold a JSON object")
    labels = _numbered(raw.get("labels"), "labels", minimum=2)
    modalities = _numbered(raw.get("modality"), "modality", minimum=1)
    training = raw.get("training")
    if not isinstance(training, list):
        raise DatasetIndexError(f"{INDEX_FILE}: 'training' must be a list of image/label pairs")
    if not training:
        raise EmptyDatasetError(f"{INDEX_FILE}: 'training' lists no case")
    cases: list[DecathlonCase] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or set(entry) != {"image", "label"}:
            raise DatasetIndexError(
                f"{INDEX_FILE}: training[{i}] must have exactly 'image' and 'label'"
            )
        image = _inside(root, entry["image"], f"training[{i}].image")
        label = _inside(root, entry["label"], f"training[{i}].label")
        case_id = _case_id(entry["image"])
        if case_id in seen:
            raise DatasetError(
                f"{INDEX_FILE}: training[{i}] and training[{seen[case_id]}] are both case "
                f"{case_id!r}",
                code="data.duplicate_record",
            )
        seen[case_id] = i
        cases.append(DecathlonCase(case_id, image, label))
    return DecathlonIndex(labels, modalities, tuple(cases))


def _read_pair(case: DecathlonCase, root: Path) -> dict[str, Any]:
    """The case's image and label, channel-first MONAI tensors with their affines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI's optional-codec probes
        loader = LoadImaged(keys=(IMAGE, LABEL), reader=NibabelReader, image_only=True)
        channels = EnsureChannelFirstd(keys=(IMAGE, LABEL))
        try:
            data = loader({IMAGE: str(case.image), LABEL: str(case.label)})
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError
            raise UnreadableFileError(
                f"case {case.case_id!r}: {case.image.relative_to(root.resolve())} or its "
                f"label cannot be read as NIfTI ({type(exc).__name__})"
            ) from None
        return {str(key): value for key, value in channels(data).items()}


def _make_record(
    case: DecathlonCase,
    *,
    root: Path,
    index: DecathlonIndex,
    preprocessing: PreprocessingSpec,
    image_size: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Read, check and preprocess one case (see the module docstring)."""
    base = root.resolve()
    image_name = case.image.relative_to(base).as_posix()
    label_name = case.label.relative_to(base).as_posix()
    data = _read_pair(case, root)
    image, label = data[IMAGE], data[LABEL]
    if image.shape[0] != len(index.modalities):
        raise ShapeMismatchError(
            f"{image_name!r} has {image.shape[0]} channel(s); {INDEX_FILE} declares "
            f"{len(index.modalities)} modalities"
        )
    if label.shape[0] != 1 or tuple(label.shape[1:]) != tuple(image.shape[1:]):
        raise ShapeMismatchError(
            f"label {label_name!r} {list(label.shape[1:])} does not match image "
            f"{image_name!r} {list(image.shape[1:])} voxel for voxel",
        )
    if image.ndim - 1 not in (2, 3):
        raise ShapeMismatchError(f"{image_name!r} has {image.ndim - 1} spatial axes, not 2 or 3")
    values = torch.unique(plain_tensor(label))
    declared = torch.arange(len(index.labels), dtype=values.dtype)
    if not bool(torch.isin(values, declared).all()):
        raise UndeclaredLabelValueError(
            f"label {label_name!r} holds a value that is not one of the {len(index.labels)} "
            f"labels {INDEX_FILE} declares (0 .. {len(index.labels) - 1})",
            hint="fix the label map, or declare the label in dataset.json",
        )
    out = apply_preprocessing(
        {IMAGE: image, LABEL: label}, preprocessing, name=image_name, fallback_size=image_size
    )
    image_out = plain_tensor(out[IMAGE])
    if not preprocessing.steps:
        image_out = plain_tensor(ScaleIntensity(channel_wise=True)(image_out))
    label_out = torch.round(plain_tensor(out[LABEL]))[0].to(torch.int64)
    if tuple(image_out.shape[1:]) != tuple(label_out.shape):
        raise ShapeMismatchError(
            f"after preprocessing, {image_name!r} and its label differ in shape "
            f"({list(image_out.shape[1:])} and {list(label_out.shape)}): their affines differ"
        )
    return image_out.numpy().astype(np.float32), label_out.numpy()


def load_decathlon(
    root: Path,
    *,
    split: Split,
    test_fraction: float,
    seed: int,
    image_size: int,
    preprocessing: PreprocessingSpec | None = None,
    cache: RecordCache | None = None,
    modality: str | None = None,
    dataset_id: str | None = None,
) -> LocalDataset:
    """Load one split of a Decathlon dataset as a segmentation :class:`LocalDataset`.

    Raises:
        MissingFileError, DatasetIndexError, PathOutsideDatasetError, EmptyDatasetError:
            see :func:`read_decathlon_index`.
        UnreadableFileError: a listed file is not NIfTI.
        ShapeMismatchError: an image and its label differ in shape, or an image has not
            the declared number of channels.
        UndeclaredLabelValueError: a label map holds an undeclared value.
        PreprocessingError: the declared steps are for other spatial axes.
    """
    index = read_decathlon_index(root)
    spec = preprocessing or PreprocessingSpec()
    train_idx, test_idx = assign_split(
        [c.case_id for c in index.cases], test_fraction=test_fraction, seed=seed
    )
    idx = train_idx if split == "train" else test_idx
    check_split_size(len(idx), split=split, total=len(index.cases), source=INDEX_FILE)
    recipe = {
        "loader": _RECIPE,
        "preprocessing": spec.digest() if spec.steps else None,
        "image_size": image_size,
        "labels": len(index.labels),
        "channels": len(index.modalities),
    }
    images: list[npt.NDArray[np.float32]] = []
    labels: list[npt.NDArray[np.int64]] = []
    for i in idx:
        case = index.cases[int(i)]

        def load(case: DecathlonCase = case) -> tuple[npt.NDArray[Any], ...]:
            return _make_record(
                case, root=root, index=index, preprocessing=spec, image_size=image_size
            )

        files: Sequence[Path] = (case.image, case.label)
        record = cache.get_or_load(files, recipe, load) if cache is not None else load()
        images.append(record[0])
        labels.append(record[1])
    return LocalDataset(
        features=torch.from_numpy(np.stack(images)),
        labels=torch.from_numpy(np.stack(labels)),
        num_classes=len(index.labels),
        modality=modality or "/".join(index.modalities),
        class_names=index.labels,
        split=split,
        dataset_id=dataset_id,
        task="segmentation",
    )
