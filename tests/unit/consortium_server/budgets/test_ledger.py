"""The privacy-budget ledger: reserve, charge, release, and its refusals (both backends)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from consortium_server.budgets.models import BudgetAccount
from consortium_server.budgets.service import (
    BudgetExceededError,
    BudgetReportError,
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
from consortium_server.db.session import session_scope
from consortium_server.errors import ConflictError, NotFoundError

from .conftest import MakeDatasets

Factory = sessionmaker[Session]


def test_reserve_charge_release(factory: Factory, make_datasets: MakeDatasets) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        lines = reserve(session, "study-1", [a], 3.0, 1e-5)
        assert lines[0].epsilon_reserved == Decimal("3")
    with session_scope(factory) as session:
        view = show(session, a)
        assert (view.epsilon_cap, view.epsilon_spent, view.epsilon_reserved) == (10, 0, 3)
        assert view.epsilon_remaining == 7
        assert view.delta_reserved == Decimal("0.00001")
        charge(session, "study-1", a, 1.25)
        line = charge(session, "study-1", a, 0.5)
        assert (line.epsilon_charged, line.epsilon_outstanding, line.charges) == (
            Decimal("1.75"),
            Decimal("1.25"),
            2,
        )
    with session_scope(factory) as session:
        view = show(session, a)
        assert (view.epsilon_spent, view.epsilon_reserved, view.epsilon_remaining) == (
            Decimal("1.75"),
            Decimal("1.25"),
            Decimal("7"),
        )
        assert (view.delta_spent, view.delta_reserved) == (Decimal("0.00001"), 0)
        assert reservation_remaining(session, "study-1") == {a: Decimal("1.25")}
        (released,) = release(session, "study-1")
        assert released.epsilon_released == Decimal("1.25")
        assert not released.open
    with session_scope(factory) as session:
        view = show(session, a)
        assert (view.epsilon_spent, view.epsilon_reserved, view.epsilon_remaining) == (
            Decimal("1.75"),
            0,
            Decimal("8.25"),
        )
        assert view.lines[0].study_id == "study-1"
        assert view.as_dict()["epsilon_remaining"] == "8.25"
        assert release(session, "study-1")[0].epsilon_released == Decimal("1.25")  # idempotent
        assert reservation_remaining(session, "study-1") == {a: 0}


def test_exceeding_the_budget_is_refused_with_the_numbers(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 6.0, 1e-6)
        charge(session, "s1", a, 6.0)
        reserve(session, "s2", [a], 2.5, 1e-6)
    with session_scope(factory) as session, pytest.raises(BudgetExceededError) as caught:
        reserve(session, "s3", [a], 3.0, 1e-6)
    error = caught.value
    assert error.code == "budget.exceeded"
    assert error.status == 409
    assert (
        f"dataset {a}: requested ε=3.0, remaining ε=1.5 of 10.0 (spent 6.0, reserved 2.5)"
        in str(error)
    )
    assert error.details[0]["remaining_epsilon"] == "1.5"
    with session_scope(factory) as session:
        assert remaining_epsilon(session, [a]) == {a: Decimal("1.5")}
        reserve(session, "s4", [a], 1.5, 1e-6)  # exactly what is left is fine


def test_delta_budget_is_enforced_too(factory: Factory, make_datasets: MakeDatasets) -> None:
    (a,) = make_datasets(delta_cap=1e-5, a=10.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 1.0, 6e-6)
    with session_scope(factory) as session, pytest.raises(BudgetExceededError) as caught:
        reserve(session, "s2", [a], 1.0, 6e-6)
    assert "requested δ=0.000006, remaining δ=0.000004 of 0.00001" in str(caught.value)


def test_reservation_is_all_or_nothing(factory: Factory, make_datasets: MakeDatasets) -> None:
    a, b, c = make_datasets(a=10.0, b=2.0, c=1.0)
    with session_scope(factory) as session, pytest.raises(BudgetExceededError) as caught:
        reserve(session, "s1", [a, b, c], 3.0, 1e-6)
    message = str(caught.value)
    assert f"dataset {b}: requested ε=3.0, remaining ε=2.0" in message
    assert f"dataset {c}: requested ε=3.0, remaining ε=1.0" in message
    assert f"dataset {a}:" not in message
    with session_scope(factory) as session:
        for dataset_id in (a, b, c):
            view = show(session, dataset_id)
            assert (view.epsilon_reserved, view.lines) == (0, [])


def test_a_charge_beyond_the_reservation_is_charged_as_an_overspend(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    """The ledger records what was spent: beyond the reservation too, as an overspend that
    drives the dataset's remaining budget negative and is not given back at release."""
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 2.0, 1e-6)
        charge(session, "s1", a, 1.5)
        line = charge(session, "s1", a, 0.6)
        assert (line.epsilon_charged, line.epsilon_overspent) == (Decimal("2.1"), Decimal("0.1"))
        assert line.epsilon_outstanding == 0
        assert overspent(session, "s1") == {a: Decimal("0.1")}
    with session_scope(factory) as session:
        view = show(session, a)
        assert (view.epsilon_spent, view.epsilon_reserved) == (Decimal("2.1"), 0)
        assert view.epsilon_overspent == Decimal("0.1")
        # The accountant reports a cumulative epsilon: only the increase is charged.
        assert charge_cumulative(session, "s1", a, 2.5).epsilon_charged == Decimal("2.5")
        assert show(session, a).epsilon_overspent == Decimal("0.5")
        (released,) = release(session, "s1")
        assert released.epsilon_released == 0
        assert show(session, a).epsilon_remaining == Decimal("7.5")


def test_a_site_fully_overspending_a_small_budget_drives_remaining_negative(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    (a,) = make_datasets(a=1.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 1.0, 1e-6)
        charge_cumulative(session, "s1", a, 1.75)
        view = show(session, a)
        assert view.epsilon_spent == Decimal("1.75")
        assert view.epsilon_remaining == Decimal("-0.75")
        with pytest.raises(BudgetExceededError):
            reserve(session, "s2", [a], 0.1, 1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "-1", "NaN"])
def test_a_negative_or_non_finite_report_is_refused_and_changes_nothing(
    factory: Factory, make_datasets: MakeDatasets, bad: object
) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 2.0, 1e-6)
        charge(session, "s1", a, 0.5)
    for operation in (charge, charge_cumulative):
        with session_scope(factory) as session, pytest.raises(BudgetReportError) as caught:
            operation(session, "s1", a, bad)  # type: ignore[arg-type]
        assert caught.value.code == "budget.report_invalid"
    with session_scope(factory) as session:
        assert show(session, a).epsilon_spent == Decimal("0.5")


def test_a_falling_cumulative_report_is_refused(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 2.0, 1e-6)
        charge_cumulative(session, "s1", a, 1.2)
        assert charge_cumulative(session, "s1", a, 1.2).epsilon_charged == Decimal("1.2")
        with pytest.raises(BudgetReportError, match=r"1\.1 is below the 1\.2") as caught:
            charge_cumulative(session, "s1", a, 1.1)
        assert caught.value.code == "budget.report_fell"
        assert show(session, a).epsilon_spent == Decimal("1.2")


def test_charges_need_an_open_reservation(factory: Factory, make_datasets: MakeDatasets) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        with pytest.raises(ConflictError, match="has no reservation") as caught:
            charge(session, "nobody", a, 0.1)
        assert caught.value.code == "budget.not_reserved"
        reserve(session, "s1", [a], 1.0, 1e-6)
        release(session, "s1")
        with pytest.raises(ConflictError, match="was released"):
            charge(session, "s1", a, 0.1)
        with pytest.raises(ConflictError) as twice:
            reserve(session, "s1", [a], 1.0, 1e-6)
        assert twice.value.code == "budget.already_reserved"


def test_unused_delta_returns_only_if_never_charged(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        reserve(session, "aborted", [a], 1.0, 2e-6)
        release(session, "aborted")
        assert show(session, a).delta_spent == 0
        reserve(session, "ran", [a], 1.0, 2e-6)
        charge(session, "ran", a, 0.1)
        release(session, "ran")
        view = show(session, a)
        assert (view.delta_spent, view.delta_reserved) == (Decimal("0.000002"), 0)


def test_unknown_dataset_and_explicit_account(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        with pytest.raises(NotFoundError):
            reserve(session, "s1", [a, "no-such-dataset"], 1.0, 1e-6)
        with pytest.raises(NotFoundError):
            show(session, "no-such-dataset")
        assert show(session, a).epsilon_cap == 10  # no account yet: the catalogue cap
        view = open_account(session, a, epsilon_cap=4.0, delta_cap=1e-5)
        assert view.epsilon_cap == 4
        assert open_account(session, a, epsilon_cap=99, delta_cap=1).epsilon_cap == 4


def test_the_database_refuses_an_overdrawn_account(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    """Backstop: the invariant is a check constraint, whatever code writes the rows."""
    (a,) = make_datasets(a=10.0)
    with session_scope(factory) as session:
        reserve(session, "s1", [a], 9.0, 1e-6)
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.execute(
            update(BudgetAccount)
            .where(BudgetAccount.dataset_id == a)
            .values(epsilon_spent=BudgetAccount.epsilon_cap)
        )
