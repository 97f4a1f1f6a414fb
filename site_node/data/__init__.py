"""Local datasets: configuration, loaders (CSV, image folders, NIfTI, DICOM) and demo data."""

from site_node.data.csv_loader import load_csv, read_ranges_file, scale_to_ranges
from site_node.data.dataset import LocalDataset, Split, assign_split, encode_labels
from site_node.data.demo import (
    breast_cancer_holdout,
    breast_cancer_site,
    synthetic_images_holdout,
    synthetic_images_site,
)
from site_node.data.image_folder import load_image_folder
from site_node.data.registry import DatasetConfig, DatasetKind, load_dataset
from site_node.data.volumes import VolumeMode, load_volumes

__all__ = [
    "DatasetConfig",
    "DatasetKind",
    "LocalDataset",
    "Split",
    "VolumeMode",
    "assign_split",
    "breast_cancer_holdout",
    "breast_cancer_site",
    "encode_labels",
    "load_csv",
    "load_dataset",
    "load_image_folder",
    "load_volumes",
    "read_ranges_file",
    "scale_to_ranges",
    "synthetic_images_holdout",
    "synthetic_images_site",
]
