"""Shared builders for the policy tests: the shipped policies, a compliant study, datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from concord_protocol.contract import StudyContract
from concord_protocol.policy.engine import PolicyEngine
from concord_protocol.policy.facts import ConsortiumFacts, DatasetFacts
from concord_protocol.principals import Principal, Role
from tests.support.roster import roster

POLICIES = Path(__file__).resolve().parents[4] / "policies"
SCHEMA = POLICIES / "schema.cedarschema"

FACTS = ConsortiumFacts(
    model_catalogue=frozenset({("tabular-mlp", "1"), ("unet-small", "2.0")}),
    member_organisations=frozenset(
        {"university-a", "hospital-a", "hospital-b", "hospital-c", "hospital-d"}
    ),
    site_organisations={
        "site-a": "hospital-a",
        "site-b": "hospital-b",
        "site-c": "hospital-c",
        "site-d": "hospital-d",
    },
)

ALICE = Principal(
    subject="alice", roles=frozenset({Role.RESEARCHER}), organisation="university-a", issuer="t"
)


def contract(**changes: Any) -> StudyContract:
    """A study every shipped rule allows; ``changes`` are dotted paths, e.g.
    ``**{"privacy.epsilon": 3.0}``."""
    data: dict[str, Any] = {
        "title": "Sepsis early warning",
        "purpose": "diagnostic_research",
        "ethics_reference": "IRB-2026-0142",
        "datasets": ["d-a", "d-b", "d-c"],
        "model": {"name": "tabular-mlp", "version": "1"},
        "training": {"rounds": 5},
        "privacy": {"epsilon": 2.0, "delta": 1e-5},
        "federation": {"min_sites": 3},
        "encryption": {"enabled": True},
        "roster": [
            m.model_dump(mode="json") for m in roster(["hospital-a", "hospital-b", "hospital-c"])
        ],
        "key_generator": "hospital-a",
    }
    unchecked: dict[str, Any] = {}
    for path, value in changes.items():
        if path.startswith("!"):  # bypass validation (values the contract model refuses)
            unchecked[path[1:]] = value
            continue
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    result = StudyContract.model_validate(data)
    return result.model_copy(update=unchecked) if unchecked else result


#: The lifetime budget every test dataset has left (see :func:`plenty`).
BUDGET = 10.0


def dataset(dataset_id: str, site_id: str, **changes: Any) -> DatasetFacts:
    """What the policy sees of a catalogue dataset."""
    values: dict[str, Any] = {
        "id": dataset_id,
        "site_id": site_id,
        "allowed_purposes": ("diagnostic_research", "public_health", "method_development"),
        "max_epsilon_per_study": 2.0,
        "requires_encryption": True,
    }
    values.update(changes)
    values["allowed_purposes"] = tuple(values["allowed_purposes"])
    return DatasetFacts(**values)


def datasets(**per_dataset: dict[str, Any]) -> list[DatasetFacts]:
    """d-a, d-b, d-c at three sites; ``per_dataset={"d_a": {...}}`` overrides."""
    return [
        dataset("d-a", "site-a", **per_dataset.get("d_a", {})),
        dataset("d-b", "site-b", **per_dataset.get("d_b", {})),
        dataset("d-c", "site-c", **per_dataset.get("d_c", {})),
    ]


def plenty(rows: list[DatasetFacts]) -> dict[str, float]:
    """Every dataset's whole budget left."""
    return {row.id: BUDGET for row in rows}


@pytest.fixture(scope="session")
def engine() -> PolicyEngine:
    """The shipped consortium policy set."""
    return PolicyEngine.load(POLICIES / "consortium", SCHEMA)


@pytest.fixture(scope="session")
def load_site() -> Callable[..., PolicyEngine]:
    """Load a site policy set from template names and/or extra texts."""

    def load(*templates: str, extra: dict[str, str] | None = None) -> PolicyEngine:
        texts = {name: (POLICIES / "sites" / name).read_text() for name in templates}
        texts.update(extra or {})
        return PolicyEngine.load(texts, SCHEMA, label="site:site-a")

    return load
