"""Declared feature ranges of public reference datasets (data dictionaries, not statistics).

A CSV dataset's features are scaled with ranges declared in its configuration
(:mod:`site_node.data.csv_loader`), never with statistics of the site's records. For the
Wisconsin Diagnostic Breast Cancer features, the public reference is the data set's own
published description (UCI; scikit-learn's ``load_breast_cancer().DESCR``, "Summary
Statistics"): the minimum and maximum of each feature over the 569 published cases. The demo
sites and the deployment test declare these ranges; a hospital exporting the same features
would declare its laboratory's plausible ranges the same way.
"""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["WDBC_FEATURE_RANGES", "write_ranges_file"]

#: Feature -> (low, high) as published with the WDBC data set (scikit-learn's feature names).
WDBC_FEATURE_RANGES: dict[str, tuple[float, float]] = {
    "mean radius": (6.981, 28.11),
    "mean texture": (9.71, 39.28),
    "mean perimeter": (43.79, 188.5),
    "mean area": (143.5, 2501.0),
    "mean smoothness": (0.053, 0.163),
    "mean compactness": (0.019, 0.345),
    "mean concavity": (0.0, 0.427),
    "mean concave points": (0.0, 0.201),
    "mean symmetry": (0.106, 0.304),
    "mean fractal dimension": (0.05, 0.097),
    "radius error": (0.112, 2.873),
    "texture error": (0.36, 4.885),
    "perimeter error": (0.757, 21.98),
    "area error": (6.802, 542.2),
    "smoothness error": (0.002, 0.031),
    "compactness error": (0.002, 0.135),
    "concavity error": (0.0, 0.396),
    "concave points error": (0.0, 0.053),
    "symmetry error": (0.008, 0.079),
    "fractal dimension error": (0.001, 0.03),
    "worst radius": (7.93, 36.04),
    "worst texture": (12.02, 49.54),
    "worst perimeter": (50.41, 251.2),
    "worst area": (185.2, 4254.0),
    "worst smoothness": (0.071, 0.223),
    "worst compactness": (0.027, 1.058),
    "worst concavity": (0.0, 1.252),
    "worst concave points": (0.0, 0.291),
    "worst symmetry": (0.156, 0.664),
    "worst fractal dimension": (0.055, 0.208),
}


def write_ranges_file(path: Path, ranges: dict[str, tuple[float, float]]) -> Path:
    """Write ``ranges`` as a ``column,low,high`` data dictionary (what a CSV dataset's
    ``feature_ranges_file`` names)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["column", "low", "high"])
        for column, (low, high) in ranges.items():
            writer.writerow([column, repr(low), repr(high)])
    return path
