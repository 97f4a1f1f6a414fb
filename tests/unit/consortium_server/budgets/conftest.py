"""Builders for the ledger tests: sites and datasets with given budgets, on both backends."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from consortium_server.datasets.models import Dataset
from consortium_server.db.session import make_sessionmaker, session_scope
from consortium_server.sites.models import Site

MakeDatasets = Callable[..., list[str]]


def add_datasets(session: Session, caps: dict[str, float], delta_cap: float = 1e-4) -> list[str]:
    """A site and one dataset per entry of ``caps`` (id suffix -> epsilon budget)."""
    tag = uuid.uuid4().hex[:8]
    site_id = f"site-{tag}"
    session.add(
        Site(
            id=site_id,
            organisation=f"hospital-{tag}",
            display_name="Hospital",
            contact_email="dpo@example.org",
            signing_public_key="00" * 32,
            exchange_public_key="00" * 32,
            supernode_public_key="-",
            enrolled_by="op",
        )
    )
    session.flush()
    ids = []
    for name, cap in caps.items():
        dataset_id = f"{name}-{tag}"
        session.add(
            Dataset(
                id=dataset_id,
                site_id=site_id,
                title=name,
                modality="tabular",
                task="classification",
                record_count=100,
                allowed_purposes=["diagnostic_research"],
                epsilon_budget=cap,
                delta_budget=delta_cap,
                max_epsilon_per_study=cap,
                requires_encryption=True,
                controller="Hospital",
                legal_basis="Art. 9(2)(j) GDPR",
                retention="10 years",
                published_by="steward",
            )
        )
        ids.append(dataset_id)
    session.flush()
    return ids


@pytest.fixture
def factory(db_engine: Engine) -> sessionmaker[Session]:
    """Session factory on the test's backend."""
    return make_sessionmaker(db_engine)


@pytest.fixture
def make_datasets(factory: sessionmaker[Session]) -> MakeDatasets:
    """Create (and commit) datasets with the given epsilon caps; returns their ids."""

    def make(delta_cap: float = 1e-4, **caps: float) -> list[str]:
        with session_scope(factory) as session:
            return add_datasets(session, caps, delta_cap)

    return make
