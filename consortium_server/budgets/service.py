"""The privacy-budget ledger: reserve at approval, charge per round, release at the end.

Every dataset has a lifetime (epsilon, delta) budget, its *cap* (from the catalogue entry,
``Dataset.epsilon_budget`` / ``delta_budget``, copied into the dataset's account when the
account is opened). The ledger keeps, per dataset, what is **spent** and what is
**reserved**, and holds the invariant ``spent + reserved <= cap`` (checked here and by a
database check constraint).

Life of a study's budget:

1. :func:`reserve` when the study is approved: its (epsilon, delta) is reserved on every
   dataset it uses, all or nothing. A study that would exceed any dataset's remaining
   budget (``cap - spent - reserved``) is refused with :class:`BudgetExceededError`,
   whose message gives the numbers for every dataset short of budget.
2. :func:`charge` (or :func:`charge_cumulative`) after each round: what the site's
   accountant reports moves from reserved to spent. **Everything reported is charged**: a
   charge beyond what is left of the reservation is recorded as an *overspend*
   (``epsilon_overspent`` on the line and the account), which flags the study and blocks
   its release; the dataset's remaining budget goes negative, so no further study can
   reserve on it until its cap is raised. A negative or non-finite report is refused
   (:class:`BudgetReportError`, ``budget.report_invalid``), and so is a cumulative figure
   below what is already charged (``budget.report_fell``): the caller audits both. The
   study's delta is charged in full with the first charge (a DP guarantee holds at the
   declared delta whatever the number of rounds).
3. :func:`release` when the study completes, fails or is aborted: what was reserved but
   not charged goes back to the dataset.

Composition. Across studies the ledger uses **basic (sequential) composition**: if
studies with guarantees (eps_1, delta_1), ..., (eps_k, delta_k) all use a dataset, the
dataset's patients are protected at (eps_1 + ... + eps_k, delta_1 + ... + delta_k), so
the sums of charged epsilons and deltas are held under the caps. This is an upper bound
that needs no assumption about how studies relate. Within one study the site's accountant
(Opacus RDP/PRV) composes the rounds much more tightly than summing per-round epsilons;
that is why each site reports its accountant's *cumulative* epsilon for the study
(:func:`charge_cumulative` charges the increase), never a sum of per-round values.

Concurrency. Every operation locks the accounts it touches before reading them, in a
stable order (dataset id) so two transactions never wait on each other in a cycle: on
PostgreSQL with ``SELECT ... FOR UPDATE``, on SQLite the engine's ``BEGIN IMMEDIATE``
already serialises writers. So two studies reserving at once can never overdraw.

Amounts are stored as integers (epsilon in 1e-6, delta in 1e-12): requests and charges
are rounded up, caps down, so rounding never loosens the ledger. Services take
``session``, flush, and never commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from consortium_server.budgets.models import DELTA_UNIT, EPSILON_UNIT, BudgetAccount, BudgetLine
from consortium_server.datasets.models import Dataset
from consortium_server.db.base import utcnow
from consortium_server.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
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

Amount = float | int | str | Decimal


class BudgetExceededError(ConflictError):
    """A reservation would take a dataset over its lifetime budget (``budget.exceeded``).

    The message gives, per dataset short of budget, the numbers:
    ``dataset bc-hospital-a: requested ε=3.0, remaining ε=1.5 of 10.0 (spent 6.0,
    reserved 2.5)``; ``details`` carries them as data.
    """

    code = "budget.exceeded"


class BudgetReportError(ConflictError):
    """A site's report the ledger cannot charge: negative or not finite
    (``budget.report_invalid``), or a cumulative figure below what is already charged
    (``budget.report_fell``). Nothing is charged; the caller records an audit entry."""

    code = "budget.report_fell"


# --------------------------------------------------------------------------- units


def _units(value: Amount, unit: Decimal, *, up: bool) -> int:
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    if not amount.is_finite():
        raise InvalidRequestError(f"not a finite amount: {value!r}", code="request.invalid")
    return int((amount / unit).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR))


def _eps(units: int) -> Decimal:
    return (Decimal(units) * EPSILON_UNIT).normalize()


def _delta(units: int) -> Decimal:
    return (Decimal(units) * DELTA_UNIT).normalize()


def _show(value: Decimal) -> str:
    text = format(value, "f")
    return text if "." in text else f"{text}.0"


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class BudgetLineView:
    """One study's reservation on a dataset (amounts as Decimals)."""

    study_id: str
    dataset_id: str
    epsilon_reserved: Decimal
    epsilon_charged: Decimal
    epsilon_released: Decimal
    epsilon_outstanding: Decimal
    epsilon_overspent: Decimal
    delta_reserved: Decimal
    delta_charged: Decimal
    delta_released: Decimal
    charges: int
    reserved_at: datetime
    last_charged_at: datetime | None
    released_at: datetime | None

    @property
    def open(self) -> bool:
        """True until the study's unused reservation was released."""
        return self.released_at is None


@dataclass(frozen=True)
class BudgetView:
    """A dataset's budget: caps, spent, reserved, remaining, and the per-study lines."""

    dataset_id: str
    epsilon_cap: Decimal
    epsilon_spent: Decimal
    epsilon_reserved: Decimal
    epsilon_remaining: Decimal
    epsilon_overspent: Decimal
    delta_cap: Decimal
    delta_spent: Decimal
    delta_reserved: Decimal
    delta_remaining: Decimal
    lines: list[BudgetLineView] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; amounts as decimal strings (no float rounding)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Decimal):
                return format(value, "f")
            if isinstance(value, datetime):
                return value.isoformat()
            return value

        lines = [{key: plain(val) for key, val in vars(line).items()} for line in self.lines]
        data = {key: plain(val) for key, val in vars(self).items() if key != "lines"}
        data["lines"] = lines
        return data


def _view(account: BudgetAccount, lines: Iterable[BudgetLine]) -> BudgetView:
    return BudgetView(
        dataset_id=account.dataset_id,
        epsilon_cap=_eps(account.epsilon_cap),
        epsilon_spent=_eps(account.epsilon_spent),
        epsilon_reserved=_eps(account.epsilon_reserved),
        epsilon_remaining=_eps(
            account.epsilon_cap - account.epsilon_spent - account.epsilon_reserved
        ),
        epsilon_overspent=_eps(account.epsilon_overspent or 0),
        delta_cap=_delta(account.delta_cap),
        delta_spent=_delta(account.delta_spent),
        delta_reserved=_delta(account.delta_reserved),
        delta_remaining=_delta(account.delta_cap - account.delta_spent - account.delta_reserved),
        lines=[_line_view(line) for line in lines],
    )


def _line_view(line: BudgetLine) -> BudgetLineView:
    return BudgetLineView(
        study_id=line.study_id,
        dataset_id=line.dataset_id,
        epsilon_reserved=_eps(line.epsilon_reserved),
        epsilon_charged=_eps(line.epsilon_charged),
        epsilon_released=_eps(line.epsilon_released),
        epsilon_outstanding=_eps(_outstanding(line)),
        epsilon_overspent=_eps(line.epsilon_overspent or 0),
        delta_reserved=_delta(line.delta_reserved),
        delta_charged=_delta(line.delta_charged),
        delta_released=_delta(line.delta_released),
        charges=line.charges,
        reserved_at=line.reserved_at,
        last_charged_at=line.last_charged_at,
        released_at=line.released_at,
    )


def _outstanding(line: BudgetLine) -> int:
    charged_within = line.epsilon_charged - (line.epsilon_overspent or 0)
    return line.epsilon_reserved - charged_within - line.epsilon_released


def _delta_outstanding(line: BudgetLine) -> int:
    return line.delta_reserved - line.delta_charged - line.delta_released


# --------------------------------------------------------------------------- locking


def _insert_missing_accounts(session: Session, dataset_ids: Sequence[str]) -> None:
    """Open accounts for datasets that have none, from their catalogue caps.

    ``INSERT ... ON CONFLICT DO NOTHING``: two transactions opening the same account at
    once do not fail, one waits for the other.
    """
    existing = set(
        session.scalars(
            select(BudgetAccount.dataset_id).where(BudgetAccount.dataset_id.in_(dataset_ids))
        )
    )
    wanted = [d for d in dataset_ids if d not in existing]
    if not wanted:
        return
    rows = session.execute(
        select(Dataset.id, Dataset.epsilon_budget, Dataset.delta_budget).where(
            Dataset.id.in_(wanted)
        )
    ).all()
    found = {row.id for row in rows}
    unknown = [d for d in wanted if d not in found]
    if unknown:
        raise NotFoundError(f"no such dataset: {', '.join(unknown)}", code="dataset.not_found")
    values = [
        {
            "dataset_id": row.id,
            "epsilon_cap": _units(row.epsilon_budget, EPSILON_UNIT, up=False),
            "delta_cap": _units(row.delta_budget, DELTA_UNIT, up=False),
            "epsilon_spent": 0,
            "epsilon_reserved": 0,
            "epsilon_overspent": 0,
            "delta_spent": 0,
            "delta_reserved": 0,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        }
        for row in rows
    ]
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(BudgetAccount).values(values).on_conflict_do_nothing())


def _lock_accounts(session: Session, dataset_ids: Iterable[str]) -> dict[str, BudgetAccount]:
    """Lock (and load fresh) the accounts of ``dataset_ids``, in dataset-id order."""
    ids = sorted(set(dataset_ids))
    _insert_missing_accounts(session, ids)
    accounts = session.scalars(
        select(BudgetAccount)
        .where(BudgetAccount.dataset_id.in_(ids))
        .order_by(BudgetAccount.dataset_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    return {account.dataset_id: account for account in accounts}


def _lines(
    session: Session, study_id: str, dataset_ids: Iterable[str] | None = None
) -> list[BudgetLine]:
    query = select(BudgetLine).where(BudgetLine.study_id == study_id)
    if dataset_ids is not None:
        query = query.where(BudgetLine.dataset_id.in_(sorted(set(dataset_ids))))
    return list(
        session.scalars(
            query.order_by(BudgetLine.dataset_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )


# --------------------------------------------------------------------------- operations


def open_account(
    session: Session, dataset_id: str, *, epsilon_cap: Amount, delta_cap: Amount
) -> BudgetView:
    """Open a dataset's account with explicit caps (no-op if it exists). Returns its view.

    Accounts are otherwise opened on first use from the dataset's catalogue caps.
    """
    existing = session.get(BudgetAccount, dataset_id)
    if existing is None:
        if session.get(Dataset, dataset_id) is None:
            raise NotFoundError(f"no such dataset: {dataset_id}", code="dataset.not_found")
        existing = BudgetAccount(
            dataset_id=dataset_id,
            epsilon_cap=_units(epsilon_cap, EPSILON_UNIT, up=False),
            delta_cap=_units(delta_cap, DELTA_UNIT, up=False),
            epsilon_spent=0,
            epsilon_reserved=0,
            epsilon_overspent=0,
            delta_spent=0,
            delta_reserved=0,
        )
        session.add(existing)
        session.flush()
    return show(session, dataset_id)


def reserve(
    session: Session,
    study_id: str,
    dataset_ids: Sequence[str],
    epsilon: Amount,
    delta: Amount,
) -> list[BudgetLineView]:
    """Reserve ``(epsilon, delta)`` for ``study_id`` on every dataset, all or nothing.

    Raises :class:`BudgetExceededError` naming every dataset whose remaining budget is
    too small (with the numbers), ``budget.already_reserved`` if the study already holds
    a reservation on one of them, ``dataset.not_found`` for an unknown dataset.
    """
    if not dataset_ids:
        raise InvalidRequestError(
            "a reservation needs at least one dataset", code="request.invalid"
        )
    eps = _units(epsilon, EPSILON_UNIT, up=True)
    dlt = _units(delta, DELTA_UNIT, up=True)
    if eps <= 0 or dlt < 0:
        raise InvalidRequestError(
            f"epsilon must be positive and delta not negative ({epsilon}, {delta})",
            code="request.invalid",
        )
    accounts = _lock_accounts(session, dataset_ids)
    held = _lines(session, study_id, accounts)
    if held:
        raise ConflictError(
            f"study {study_id} already holds a reservation on "
            + ", ".join(line.dataset_id for line in held),
            code="budget.already_reserved",
        )
    problems: list[str] = []
    details: list[dict[str, Any]] = []
    for dataset_id, account in accounts.items():
        eps_left = account.epsilon_cap - account.epsilon_spent - account.epsilon_reserved
        delta_left = account.delta_cap - account.delta_spent - account.delta_reserved
        if eps > eps_left:
            problems.append(
                f"dataset {dataset_id}: requested ε={_show(_eps(eps))}, remaining "
                f"ε={_show(_eps(eps_left))} of {_show(_eps(account.epsilon_cap))} "
                f"(spent {_show(_eps(account.epsilon_spent))}, "
                f"reserved {_show(_eps(account.epsilon_reserved))})"
            )
        if dlt > delta_left:
            problems.append(
                f"dataset {dataset_id}: requested δ={_show(_delta(dlt))}, remaining "
                f"δ={_show(_delta(delta_left))} of {_show(_delta(account.delta_cap))} "
                f"(spent {_show(_delta(account.delta_spent))}, "
                f"reserved {_show(_delta(account.delta_reserved))})"
            )
        if eps > eps_left or dlt > delta_left:
            details.append(
                {
                    "dataset_id": dataset_id,
                    "requested_epsilon": _show(_eps(eps)),
                    "remaining_epsilon": _show(_eps(eps_left)),
                    "epsilon_cap": _show(_eps(account.epsilon_cap)),
                    "epsilon_spent": _show(_eps(account.epsilon_spent)),
                    "epsilon_reserved": _show(_eps(account.epsilon_reserved)),
                    "requested_delta": _show(_delta(dlt)),
                    "remaining_delta": _show(_delta(delta_left)),
                    "delta_cap": _show(_delta(account.delta_cap)),
                }
            )
    if problems:
        raise BudgetExceededError(
            f"study {study_id} would exceed the privacy budget: " + "; ".join(problems),
            details=details,
        )
    now = utcnow()
    lines = []
    for dataset_id, account in accounts.items():
        account.epsilon_reserved += eps
        account.delta_reserved += dlt
        account.updated_at = now
        line = BudgetLine(
            study_id=study_id,
            dataset_id=dataset_id,
            epsilon_reserved=eps,
            epsilon_charged=0,
            epsilon_released=0,
            epsilon_overspent=0,
            delta_reserved=dlt,
            delta_charged=0,
            delta_released=0,
            charges=0,
            reserved_at=now,
        )
        session.add(line)
        lines.append(line)
    session.flush()
    return [_line_view(line) for line in lines]


def _open_line(
    session: Session, study_id: str, dataset_id: str
) -> tuple[BudgetAccount, BudgetLine]:
    accounts = _lock_accounts(session, [dataset_id])
    lines = _lines(session, study_id, [dataset_id])
    if not lines or lines[0].released_at is not None:
        state = "was released" if lines else "has no reservation"
        raise ConflictError(
            f"study {study_id} {state} on dataset {dataset_id}", code="budget.not_reserved"
        )
    return accounts[dataset_id], lines[0]


def _report_units(epsilon: Amount, study_id: str, dataset_id: str) -> int:
    try:
        amount = epsilon if isinstance(epsilon, Decimal) else Decimal(str(epsilon))
    except ArithmeticError:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0:
        raise BudgetReportError(
            f"study {study_id} on dataset {dataset_id}: the reported epsilon {epsilon!r} is "
            "negative or not a finite number; nothing was charged",
            code="budget.report_invalid",
            details=[{"study_id": study_id, "dataset_id": dataset_id, "reported": str(epsilon)}],
        )
    return _units(amount, EPSILON_UNIT, up=True)


def charge(session: Session, study_id: str, dataset_id: str, epsilon: Amount) -> BudgetLineView:
    """Charge ``epsilon`` (this round's spend) to the study's reservation on the dataset.

    Moves it from reserved to spent; the first charge also moves the study's delta. What
    exceeds the reservation left is charged too, as an overspend (``epsilon_overspent``):
    the caller flags the study. Raises :class:`BudgetReportError` for a negative or
    non-finite amount, ``budget.not_reserved`` without an open reservation.
    """
    eps = _report_units(epsilon, study_id, dataset_id)
    account, line = _open_line(session, study_id, dataset_id)
    within = min(eps, _outstanding(line))
    beyond = eps - within
    delta_now = _delta_outstanding(line) if line.charges == 0 else 0
    now = utcnow()
    line.epsilon_charged += eps
    line.epsilon_overspent = (line.epsilon_overspent or 0) + beyond
    line.delta_charged += delta_now
    line.charges += 1
    line.last_charged_at = now
    account.epsilon_reserved -= within
    account.epsilon_spent += eps
    account.epsilon_overspent = (account.epsilon_overspent or 0) + beyond
    account.delta_reserved -= delta_now
    account.delta_spent += delta_now
    account.updated_at = now
    session.flush()
    return _line_view(line)


def charge_cumulative(
    session: Session, study_id: str, dataset_id: str, total_epsilon: Amount
) -> BudgetLineView:
    """Charge up to the accountant's cumulative epsilon for the study on this dataset.

    Sites report the epsilon their accountant computes for the whole study so far; this
    charges the increase over what is already charged (overspend included). A total below
    what is charged is refused (``budget.report_fell``): an accountant's cumulative epsilon
    never falls, so the report is wrong, and nothing is given back.
    """
    total = _report_units(total_epsilon, study_id, dataset_id)
    _account, line = _open_line(session, study_id, dataset_id)
    if total < line.epsilon_charged:
        raise BudgetReportError(
            f"study {study_id} on dataset {dataset_id}: the reported cumulative epsilon "
            f"{_show(_eps(total))} is below the {_show(_eps(line.epsilon_charged))} already "
            "charged; nothing was changed",
            code="budget.report_fell",
            details=[
                {
                    "study_id": study_id,
                    "dataset_id": dataset_id,
                    "reported": _show(_eps(total)),
                    "charged": _show(_eps(line.epsilon_charged)),
                }
            ],
        )
    return charge(session, study_id, dataset_id, _eps(total - line.epsilon_charged))


def overspent(session: Session, study_id: str) -> dict[str, Decimal]:
    """Dataset id -> epsilon the study charged beyond its reservation (overspent lines only)."""
    return {
        line.dataset_id: _eps(line.epsilon_overspent)
        for line in session.scalars(select(BudgetLine).where(BudgetLine.study_id == study_id))
        if line.epsilon_overspent
    }


def release(session: Session, study_id: str) -> list[BudgetLineView]:
    """Return the study's unused reservations to their datasets (completion or abort).

    Idempotent: lines already released are left as they are. Returns every line of the
    study after the release (``epsilon_released`` says what went back).
    """
    dataset_ids = session.scalars(
        select(BudgetLine.dataset_id).where(BudgetLine.study_id == study_id)
    ).all()
    if not dataset_ids:
        return []
    accounts = _lock_accounts(session, dataset_ids)
    lines = _lines(session, study_id, dataset_ids)
    now = utcnow()
    for line in lines:
        if line.released_at is not None:
            continue
        account = accounts[line.dataset_id]
        eps_back = _outstanding(line)
        delta_back = _delta_outstanding(line)
        line.epsilon_released += eps_back
        line.delta_released += delta_back
        line.released_at = now
        account.epsilon_reserved -= eps_back
        account.delta_reserved -= delta_back
        account.updated_at = now
    session.flush()
    return [_line_view(line) for line in lines]


def show(session: Session, dataset_id: str) -> BudgetView:
    """A dataset's budget and its per-study lines (``consortium budget show DATASET``).

    A dataset without an account yet shows its catalogue caps, nothing spent.
    """
    account = session.get(BudgetAccount, dataset_id, populate_existing=True)
    if account is None:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise NotFoundError(f"no such dataset: {dataset_id}", code="dataset.not_found")
        account = BudgetAccount(
            dataset_id=dataset_id,
            epsilon_cap=_units(dataset.epsilon_budget, EPSILON_UNIT, up=False),
            delta_cap=_units(dataset.delta_budget, DELTA_UNIT, up=False),
            epsilon_spent=0,
            epsilon_reserved=0,
            epsilon_overspent=0,
            delta_spent=0,
            delta_reserved=0,
        )
        return _view(account, [])
    lines = session.scalars(
        select(BudgetLine)
        .where(BudgetLine.dataset_id == dataset_id)
        .order_by(BudgetLine.reserved_at, BudgetLine.id)
        .execution_options(populate_existing=True)
    ).all()
    return _view(account, lines)


def remaining_epsilon(session: Session, dataset_ids: Iterable[str]) -> dict[str, Decimal]:
    """Dataset id -> epsilon left (cap - spent - reserved), for the policy facts.

    Datasets without an account yet have their whole catalogue budget left; unknown
    datasets are left out (the policy check reports them).
    """
    ids = sorted(set(dataset_ids))
    result = {
        row.id: _eps(_units(row.epsilon_budget, EPSILON_UNIT, up=False))
        for row in session.execute(
            select(Dataset.id, Dataset.epsilon_budget).where(Dataset.id.in_(ids))
        )
    }
    for account in session.scalars(select(BudgetAccount).where(BudgetAccount.dataset_id.in_(ids))):
        result[account.dataset_id] = _eps(
            account.epsilon_cap - account.epsilon_spent - account.epsilon_reserved
        )
    return result


def reservation_remaining(session: Session, study_id: str) -> dict[str, Decimal]:
    """Dataset id -> what is left of the study's open reservation (for ``check_round``)."""
    return {
        line.dataset_id: _eps(_outstanding(line) if line.released_at is None else 0)
        for line in session.scalars(select(BudgetLine).where(BudgetLine.study_id == study_id))
    }
