"""Report queries over a consortium with history: activity, lifecycles, budgets, sites, head."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from fastapi import FastAPI
from sqlalchemy.orm import Session

from concord_protocol.audit.entries import AuditEntry, AuditObject, Outcome
from consortium_server.audit.recorder import SERVER_ACTOR
from consortium_server.reports.rows import ComplianceReport, ReportFilters
from consortium_server.reports.service import build_report
from tests.unit.consortium_server.reports.world import (
    MAIN_ROUNDS,
    ReportWorld,
    append_round,
    spent,
)


def report(app: FastAPI, session: Session, **filters: object) -> ComplianceReport:
    return build_report(
        session=session,
        log=app.state.audit_log,
        signer=app.state.tree_head_signer,
        filters=ReportFilters.model_validate(filters),
        generated_by="carla-compliance",
    )


def test_whole_consortium(app: FastAPI, world: ReportWorld) -> None:
    with app.state.sessionmaker() as session:
        built = report(app, session)

    # Activity: every entry of the log, newest first, counted by action and actor.
    assert built.head is not None
    assert built.activity_total == built.head.tree_size
    indices = [row.index for row in built.activity]
    assert indices == sorted(indices, reverse=True)
    assert built.activity_by_action["round.completed"] == 5
    assert {row.index for row in built.activity if row.action == "round.completed"} == set(
        world.round_indices
    )
    assert built.malformed_rounds == 0
    assert built.corrupt_entries == []

    # Lifecycles: who approved what and why, on which contract hash.
    by_title = {study.title: study for study in built.lifecycles}
    assert set(by_title) == {
        "Malignancy from FNA features",
        "Tumour grading pilot",
        "Cohort linkage study",
    }
    main = by_title["Malignancy from FNA features"]
    assert main.state == "approved"
    assert main.epsilon == Decimal("3")
    assert [(a.site_id, a.decision, a.decided_by) for a in main.approvals] == [
        ("hospital-a", "approved", "steward-a"),
        ("hospital-b", "approved", "steward-b"),
        ("hospital-c", "approved", "steward-c"),
    ]
    assert all(a.matches_contract for a in main.approvals)
    assert main.approvals[1].reason == "DAC minutes 2026-b: approved."
    assert [e.to_state for e in main.events] == ["submitted", "awaiting_approvals", "approved"]
    assert [(r.round, r.samples, r.digests) for r in main.rounds] == [
        (1, 569, 3),
        (2, 569, 3),
        (3, 569, 3),
    ]
    assert main.rounds[-1].epsilon == {k: Decimal(v) for k, v in MAIN_ROUNDS[-1].items()}
    declined = by_title["Cohort linkage study"]
    assert declined.state == "rejected"
    assert [(a.site_id, a.decision, a.reason) for a in declined.approvals] == [
        ("hospital-b", "declined", "Cohort overlaps with a running trial.")
    ]
    assert "Cohort overlaps" in (declined.state_reason or "")

    # Each transition points at the audit entry that records it.
    with app.state.sessionmaker() as session:
        linked = 0
        for study in built.lifecycles:
            for event in study.events:
                if event.audit_index is None:
                    continue
                linked += 1
                entry = app.state.audit_log.get_entry(event.audit_index, session=session).entry
                assert entry.action == f"study.{event.to_state}"
                assert entry.object.id == study.study_id
    assert linked > 0

    # Budgets: ledger totals, audited rounds reconcile, the series climbs to the total.
    budgets = {b.dataset_id: b for b in built.budgets}
    assert set(budgets) == {"bc-a", "bc-b", "bc-c"}
    for dataset_id, budget in budgets.items():
        assert budget.epsilon_cap == Decimal(10)
        assert budget.epsilon_spent == spent(dataset_id)
        assert budget.epsilon_charged == spent(dataset_id)
        assert budget.epsilon_audited == spent(dataset_id)
        assert budget.reconciled
        assert budget.epsilon_reserved == Decimal(5) - spent(dataset_id)
        values = [point.epsilon_spent for point in budget.series]
        assert len(values) == 5
        assert values == sorted(values)
        assert values[-1] == spent(dataset_id)
        assert len(budget.lines) == 2
    assert [p.epsilon_spent for p in budgets["bc-a"].series] == [
        Decimal(v) for v in ("0.9", "1.6", "2.2", "2.9", "3.4")
    ]

    # Contributions: two studies, five rounds, records counted once per study.
    sites = {c.site_id: c for c in built.contributions}
    assert sites["hospital-a"].rounds == 5
    assert len(sites["hospital-a"].studies) == 2
    assert sites["hospital-a"].samples == 2 * 190
    assert sites["hospital-b"].epsilon == spent("bc-b")
    assert sites["hospital-c"].datasets == ["bc-c"]


def test_study_filter(app: FastAPI, world: ReportWorld) -> None:
    main_id = world.main_study["id"]
    with app.state.sessionmaker() as session:
        built = report(app, session, study_id=main_id)
    assert built.activity
    assert {(row.object_type, row.object_id) for row in built.activity} == {("study", main_id)}
    assert [study.study_id for study in built.lifecycles] == [main_id]
    budget = next(b for b in built.budgets if b.dataset_id == "bc-a")
    assert budget.epsilon_spent == spent("bc-a")  # the dataset's total, whatever the filter
    assert budget.epsilon_charged == Decimal("2.2") == budget.epsilon_audited
    assert [line.study_id for line in budget.lines] == [main_id]
    assert len(budget.series) == 3
    site = next(c for c in built.contributions if c.site_id == "hospital-a")
    assert (site.rounds, site.samples, site.epsilon) == (3, 190, Decimal("2.2"))


def test_user_dataset_and_time_filters(app: FastAPI, world: ReportWorld) -> None:
    with app.state.sessionmaker() as session:
        by_user = report(app, session, user="steward-b")
        by_dataset = report(app, session, dataset_id="bc-b")
        everything = report(app, session)
    assert by_user.activity
    assert {row.actor for row in by_user.activity} == {"steward-b"}
    assert by_user.activity_total >= 3  # two approvals and a decline, at least
    assert [b.dataset_id for b in by_dataset.budgets] == ["bc-b"]

    rounds = [row for row in everything.activity if row.action == "round.completed"]
    first, last = min(r.at for r in rounds), max(r.at for r in rounds)
    with app.state.sessionmaker() as session:
        after = report(app, session, since=last + timedelta(microseconds=1))
        before = report(app, session, until=first)
        middle = report(app, session, since=first, until=last)
    assert all(row.at > last for row in after.activity)
    assert all(c.rounds == 0 for c in after.contributions)
    bc_a = next(b for b in after.budgets if b.dataset_id == "bc-a")
    # Clipped series: one point at `since` carrying everything spent before it.
    assert [(p.epsilon_spent, p.round) for p in bc_a.series] == [(spent("bc-a"), None)]
    assert all(not study.rounds for study in before.lifecycles)
    assert all(row.at < first for row in before.activity)
    assert sum(c.rounds for c in middle.contributions) == 3 * 4  # five rounds, last excluded


def test_round_entries_are_round_records_and_malformed_ones_are_counted(
    app: FastAPI, world: ReportWorld
) -> None:
    pilot = world.pilot_study
    with app.state.sessionmaker() as session:
        # Round 3 as the federation records it, but without the ledger charge.
        append_round(
            app,
            session,
            pilot,
            3,
            {"bc-a": "1.5", "bc-c": "1.6"},
            {"hospital-a": 190, "hospital-b": 152, "hospital-c": 227},
            charge=False,
        )
        app.state.audit_log.append(
            AuditEntry(
                actor=SERVER_ACTOR,
                action="round.completed",
                object=AuditObject(type="study", id=pilot["id"]),
                outcome=Outcome.SUCCESS,
                source="consortium-server/federation",
                details={"round": "four", "participants": "everyone"},
            ),
            session=session,
        )
        session.commit()
        built = report(app, session, study_id=pilot["id"])
    assert built.malformed_rounds == 1
    rounds = built.lifecycles[0].rounds
    assert [r.round for r in rounds] == [1, 2, 3]
    assert rounds[-1].epsilon == {"bc-a": Decimal("1.5"), "bc-c": Decimal("1.6")}
    assert rounds[-1].digests == 3
    budgets = {b.dataset_id: b for b in built.budgets}
    # The ledger was not charged for round 3: the report shows the disagreement.
    assert budgets["bc-a"].epsilon_audited == Decimal("1.5")
    assert budgets["bc-a"].epsilon_charged == Decimal("1.2")
    assert not budgets["bc-a"].reconciled
    assert budgets["bc-b"].reconciled


def test_head_is_signed_witnessed_then_moves_on(app: FastAPI, world: ReportWorld) -> None:
    with app.state.sessionmaker() as session:
        first = report(app, session)
        session.commit()
        assert first.head is not None
        assert first.head.signature_valid
        assert first.head.witnessed
        assert [(c.site_id, c.valid) for c in first.head.cosigners] == [
            ("hospital-a", True),
            ("hospital-b", True),
        ]
        assert first.head.latest_witnessed_size == first.head.tree_size

        append_round(app, session, world.main_study, 4, MAIN_ROUNDS[-1], charge=False)
        session.commit()
        second = report(app, session)
    assert second.head is not None
    assert second.head.tree_size == first.head.tree_size + 1
    assert second.head.signature_valid
    assert not second.head.witnessed
    assert second.head.cosigners == []
    assert second.head.latest_witnessed_size == first.head.tree_size
    assert second.head.latest_witnessed_root == first.head.root_hash
