"""Small Decathlon datasets on disk (16^3 NIfTI volumes with label spheres) for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

SIDE = 16
LABELS = {"0": "background", "1": "tumour", "2": "cyst"}


def _sphere(center: tuple[int, int, int], radius: float) -> np.ndarray:
    """A boolean ball in a ``SIDE``^3 grid."""
    grid = np.indices((SIDE, SIDE, SIDE))
    return sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)) <= radius**2


def write_case(root: Path, i: int, *, affine: np.ndarray | None = None) -> dict[str, str]:
    """Case ``i``: a tumour sphere (label 1) off-centre along x, a cyst (2) in odd cases;
    the image is 100 in the tumour, 50 in the cyst, noise elsewhere."""
    rng = np.random.default_rng(i)
    label = np.zeros((SIDE,) * 3, dtype=np.uint8)
    label[_sphere((4 + i % 3, 8, 8), 2.5)] = 1
    if i % 2:
        label[_sphere((12, 11, 5), 1.5)] = 2
    image = rng.uniform(0, 10, size=(SIDE,) * 3).astype(np.float32)
    image[label == 1] = 100.0
    image[label == 2] = 50.0
    aff = np.eye(4) if affine is None else affine
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, aff), str(root / "imagesTr" / f"case_{i:03d}.nii.gz"))
    nib.save(nib.Nifti1Image(label, aff), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    return {
        "image": f"./imagesTr/case_{i:03d}.nii.gz",
        "label": f"./labelsTr/case_{i:03d}.nii.gz",
    }


def write_index(root: Path, cases: list[Any], **fields: Any) -> None:
    """``root/dataset.json`` listing ``cases`` (``fields`` replace the defaults)."""
    body = {
        "name": "Tiny",
        "labels": LABELS,
        "modality": {"0": "MRI"},
        "numTraining": len(cases),
        "training": cases,
        "test": [],
        **fields,
    }
    (root / "dataset.json").write_text(json.dumps(body))


def write_decathlon(root: Path, n: int = 6, *, affine: np.ndarray | None = None) -> Path:
    """A Decathlon folder of ``n`` cases (see :func:`write_case`) at ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    write_index(root, [write_case(root, i, affine=affine) for i in range(n)])
    return root
