"""The ledger invariant under random interleavings, and under real concurrency.

Invariant: on every dataset ``spent + reserved <= cap``; ``spent`` is the sum of the
studies' charges and ``reserved`` the sum of what they still hold; no line is charged
beyond its reservation. Checked on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from consortium_server.budgets.models import BudgetAccount, BudgetLine
from consortium_server.budgets.service import charge, release, reserve, show
from consortium_server.db.session import session_scope
from consortium_server.errors import DomainError

from .conftest import MakeDatasets, add_datasets

Factory = sessionmaker[Session]
CAPS = (Decimal("10"), Decimal("6"))
STUDIES = 4


@dataclass(frozen=True)
class Op:
    """One ledger operation: reserve (on ``datasets``), charge (``datasets[0]``), release."""

    kind: str
    study: int
    datasets: tuple[int, ...] = ()
    epsilon: Decimal = Decimal(0)


amounts = [Decimal(x) for x in ("0.25", "0.5", "1", "2.5", "3", "4", "6")]
operations = st.lists(
    st.one_of(
        st.builds(
            Op,
            st.just("reserve"),
            st.integers(0, STUDIES - 1),
            st.sampled_from([(0,), (1,), (0, 1)]),
            st.sampled_from(amounts),
        ),
        st.builds(
            Op,
            st.just("charge"),
            st.integers(0, STUDIES - 1),
            st.sampled_from([(0,), (1,)]),
            st.sampled_from(amounts[:5]),
        ),
        st.builds(Op, st.just("release"), st.integers(0, STUDIES - 1)),
    ),
    min_size=1,
    max_size=25,
)


@dataclass
class Line:
    reserved: Decimal
    charged: Decimal = Decimal(0)
    open: bool = True


@dataclass
class Model:
    """What the ledger should hold, per (study, dataset)."""

    lines: dict[tuple[int, int], Line] = field(default_factory=dict)

    def spent(self, d: int) -> Decimal:
        return sum((v.charged for (_, dd), v in self.lines.items() if dd == d), Decimal(0))

    def held(self, d: int) -> Decimal:
        return sum(
            (
                max(Decimal(0), v.reserved - v.charged)
                for (_, dd), v in self.lines.items()
                if dd == d and v.open
            ),
            Decimal(0),
        )

    def overspent(self, d: int) -> Decimal:
        return sum(
            (
                max(Decimal(0), v.charged - v.reserved)
                for (_, dd), v in self.lines.items()
                if dd == d
            ),
            Decimal(0),
        )

    def apply(self, op: Op) -> bool:
        """Apply ``op``; return whether the ledger should accept it."""
        if op.kind == "reserve":
            if any((op.study, d) in self.lines for d in op.datasets):
                return False
            if any(self.spent(d) + self.held(d) + op.epsilon > CAPS[d] for d in op.datasets):
                # An overspent dataset has a negative remaining budget: nothing more fits.
                return False
            for d in op.datasets:
                self.lines[(op.study, d)] = Line(op.epsilon)
            return True
        if op.kind == "charge":
            line = self.lines.get((op.study, op.datasets[0]))
            if line is None or not line.open:
                return False
            line.charged += op.epsilon  # beyond the reservation too: an overspend
            return True
        for (study, _), line in self.lines.items():
            if study == op.study:
                line.open = False
        return True


def _check_invariant(factory: Factory, dataset_ids: list[str], model: Model) -> None:
    with session_scope(factory) as session:
        for index, dataset_id in enumerate(dataset_ids):
            view = show(session, dataset_id)
            assert (
                view.epsilon_spent + view.epsilon_reserved
                <= view.epsilon_cap + view.epsilon_overspent
            )
            assert view.epsilon_overspent == model.overspent(index)
            assert view.epsilon_cap == CAPS[index]
            assert view.epsilon_spent == sum((line.epsilon_charged for line in view.lines), 0)
            assert view.epsilon_reserved == sum(
                (line.epsilon_outstanding for line in view.lines if line.open), 0
            )
            for line in view.lines:
                assert (
                    line.epsilon_charged - line.epsilon_overspent + line.epsilon_released
                    <= line.epsilon_reserved
                )
            assert view.epsilon_spent == model.spent(index)
            assert view.epsilon_reserved == model.held(index)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_random_interleavings_keep_the_invariant(factory: Factory, ops: list[Op]) -> None:
    with session_scope(factory) as session:
        dataset_ids = add_datasets(session, {"a": float(CAPS[0]), "b": float(CAPS[1])})
    tag = uuid.uuid4().hex[:8]
    model = Model()
    for op in ops:
        expected = model.apply(op)
        study = f"study-{op.study}-{tag}"
        ids = [dataset_ids[d] for d in op.datasets]
        try:
            with session_scope(factory) as session:
                if op.kind == "reserve":
                    reserve(session, study, ids, op.epsilon, Decimal("0.000001"))
                elif op.kind == "charge":
                    charge(session, study, ids[0], op.epsilon)
                else:
                    release(session, study)
            succeeded = True
        except DomainError:
            succeeded = False
        assert succeeded == expected, op
        _check_invariant(factory, dataset_ids, model)


def _race(factory: Factory, jobs: list[tuple[str, list[str], float]]) -> list[bool]:
    """Run reservations in threads started together; True where one succeeded."""
    barrier = threading.Barrier(len(jobs))
    results: list[bool | BaseException] = [False] * len(jobs)

    def work(index: int, study: str, ids: list[str], eps: float) -> None:
        try:
            barrier.wait(timeout=10)
            with session_scope(factory) as session:
                reserve(session, study, ids, eps, 1e-6)
            results[index] = True
        except DomainError:
            results[index] = False
        except BaseException as exc:  # surfaced below
            results[index] = exc

    threads = [
        threading.Thread(target=work, args=(i, *job), daemon=True) for i, job in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a reservation hung (deadlock?)"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [bool(r) for r in results]


def test_concurrent_reservations_cannot_overdraw(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    """Eight studies ask for 3.0 of a 10.0 budget at once: exactly three get it."""
    (a,) = make_datasets(a=10.0)
    outcomes = _race(factory, [(f"s{i}", [a], 3.0) for i in range(8)])
    assert outcomes.count(True) == 3
    with session_scope(factory) as session:
        account = session.get(BudgetAccount, a)
        assert account is not None
        assert account.epsilon_reserved == 9_000_000
        lines = session.scalars(select(BudgetLine).where(BudgetLine.dataset_id == a)).all()
        assert len(lines) == 3


def test_crossed_reservations_do_not_deadlock(
    factory: Factory, make_datasets: MakeDatasets
) -> None:
    """Studies naming the same datasets in opposite orders: locks are taken in id order."""
    a, b = make_datasets(a=100.0, b=100.0)
    jobs = [(f"s{i}", [a, b] if i % 2 else [b, a], 1.0) for i in range(6)]
    assert _race(factory, jobs) == [True] * 6
    with session_scope(factory) as session:
        assert show(session, a).epsilon_reserved == 6
        assert show(session, b).epsilon_reserved == 6
