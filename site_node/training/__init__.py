"""Training core: model catalogue, parameter vectors, train/evaluate loops, baseline, and
the loader of released models (:mod:`site_node.training.released`)."""

from concord_protocol.catalogue import (
    CatalogueEntry,
    HyperParameter,
    get_entry,
    list_models,
    resolve_hyperparameters,
)
from site_node.training.baseline import BaselineResult, centralised_baseline, pool
from site_node.training.catalogue import build_model
from site_node.training.loops import EvalResult, TrainResult, evaluate, make_optimizer, train_round
from site_node.training.params import (
    ManifestEntry,
    flatten,
    manifest_digest,
    num_parameters,
    parameter_manifest,
    unflatten_into,
)
from site_node.training.released import load_released_model

__all__ = [
    "BaselineResult",
    "CatalogueEntry",
    "EvalResult",
    "HyperParameter",
    "ManifestEntry",
    "TrainResult",
    "build_model",
    "centralised_baseline",
    "evaluate",
    "flatten",
    "get_entry",
    "list_models",
    "load_released_model",
    "make_optimizer",
    "manifest_digest",
    "num_parameters",
    "parameter_manifest",
    "pool",
    "resolve_hyperparameters",
    "train_round",
    "unflatten_into",
]
