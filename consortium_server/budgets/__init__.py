"""The privacy-budget ledger: per-dataset lifetime (epsilon, delta) budgets, reserved at
study approval, charged per round, released at the end (see ``service``)."""

from __future__ import annotations

from consortium_server.budgets.service import (
    BudgetExceededError,
    BudgetLineView,
    BudgetReportError,
    BudgetView,
    charge,
    charge_cumulative,
    open_account,
    overspent,
    release,
    remaining_epsilon,
    reservation_remaining,
    reserve,
    show,
)

__all__ = [
    "BudgetExceededError",
    "BudgetLineView",
    "BudgetReportError",
    "BudgetView",
    "charge",
    "charge_cumulative",
    "open_account",
    "overspent",
    "release",
    "remaining_epsilon",
    "reservation_remaining",
    "reserve",
    "show",
]
