"""Differential privacy for site training: Opacus DP-SGD with a persistent accountant."""

from site_node.privacy.dp import (
    STATE_FORMAT,
    AccountantMechanism,
    DpPlan,
    DpTrainer,
    PrivateRound,
    compute_epsilon,
)

__all__ = [
    "STATE_FORMAT",
    "AccountantMechanism",
    "DpPlan",
    "DpTrainer",
    "PrivateRound",
    "compute_epsilon",
]
