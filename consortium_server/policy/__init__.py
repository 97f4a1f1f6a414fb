"""Data-use policies as code: Cedar policies validated against the Concord schema.

``engine`` loads and evaluates a policy set, ``facts`` turns domain objects into Cedar
entities, ``decisions`` holds the decision points of a study's life (submission, site
approval, rounds, release), ``service`` publishes and versions the consortium's set.
"""

from __future__ import annotations

from consortium_server.policy.decisions import (
    check_read_report,
    check_release,
    check_round,
    check_site_approval,
    check_submission,
    combine,
)
from consortium_server.policy.engine import (
    Decision,
    PolicyEngine,
    PolicyLoadError,
    Reason,
    Request,
    policy_set_hash,
)
from consortium_server.policy.facts import ConsortiumFacts, build_study_facts, owner_principal

__all__ = [
    "ConsortiumFacts",
    "Decision",
    "PolicyEngine",
    "PolicyLoadError",
    "Reason",
    "Request",
    "build_study_facts",
    "check_read_report",
    "check_release",
    "check_round",
    "check_site_approval",
    "check_submission",
    "combine",
    "owner_principal",
    "policy_set_hash",
]
