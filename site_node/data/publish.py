"""The catalogue entry a site publishes for a local dataset: governance fields the site
chooses plus a summary computed locally. No record and no feature value leaves."""

from __future__ import annotations

from typing import Any

from site_node.data.registry import DatasetConfig, load_dataset

__all__ = ["catalogue_entry"]


def catalogue_entry(config: DatasetConfig, governance: dict[str, Any]) -> dict[str, Any]:
    """``governance`` (id, site_id, title, purposes, budgets, GDPR fields) completed with the
    record count, modality, task and a non-identifying feature summary of ``config``."""
    train = load_dataset(config, split="train")
    test = load_dataset(config, split="test")
    summary = train.summary()
    entry = dict(governance)
    entry["record_count"] = len(train) + len(test)
    entry["feature_summary"] = {
        "input_shape": summary["input_shape"],
        "num_classes": summary["num_classes"],
        "label_counts_train": summary["label_counts"],
        **({"features": len(summary["feature_names"])} if "feature_names" in summary else {}),
    }
    entry["modality"] = "tabular" if train.modality == "tabular" else "image"
    if train.task == "segmentation":
        entry["task"] = "segmentation"
    else:
        entry["task"] = (
            "binary_classification" if train.num_classes == 2 else "multiclass_classification"
        )
    return entry
