"""A site's own data-use policy, evaluated at the site on top of the consortium's.

The site's policy directory holds Cedar files (start from ``policies/sites/``: the base
permit plus the site's forbid rules). A study may use the site's datasets only if the
consortium policy AND the site policy allow it: the site can tighten, never loosen.
Stewards (and ``consortium demo``) use :func:`check_study` before approving.
"""

from __future__ import annotations

from pathlib import Path

from concord_protocol.catalogue import catalogue_keys
from concord_protocol.client import ConsortiumClient
from concord_protocol.contract import StudyContract
from concord_protocol.policy.decisions import check_site_approval
from concord_protocol.policy.engine import SCHEMA_FILENAME, Decision, PolicyEngine
from concord_protocol.policy.facts import ConsortiumFacts, DatasetFacts, owner_principal
from concord_protocol.policy.shipped import shipped_policies

__all__ = ["check_study", "load_site_engine"]


def load_site_engine(directory: Path, *, site_id: str, schema: Path | None = None) -> PolicyEngine:
    """The site's policy set, validated against the consortium schema."""
    return PolicyEngine.load(
        directory, schema or shipped_policies() / SCHEMA_FILENAME, label=f"site:{site_id}"
    )


def check_study(
    client: ConsortiumClient,
    study_id: str,
    *,
    site_id: str,
    site_engine: PolicyEngine,
    schema: Path | None = None,
    member_organisations: frozenset[str] = frozenset(),
) -> Decision:
    """Evaluate the consortium's active policy and the site's own policy for this site.

    Everything comes from the API (the study, the catalogue, the active consortium policy,
    the sites, the budgets): a site needs no database access.
    """
    study = client.get_study(study_id)
    contract = StudyContract.model_validate(study["contract"])
    active = client.request("GET", "/api/v1/policy")
    consortium = PolicyEngine.load(
        active["files"], (schema or shipped_policies() / SCHEMA_FILENAME).read_text()
    )
    datasets = [
        DatasetFacts.from_mapping(client.request("GET", f"/api/v1/datasets/{d}"))
        for d in contract.datasets
    ]
    sites = {s["id"]: s["organisation"] for s in client.list_sites()}
    remaining = {
        d: client.request("GET", f"/api/v1/budgets/{d}")["epsilon_remaining"]
        for d in contract.datasets
    }
    # Membership is the consortium's rule, checked by the server at submission: the site
    # counts the owner's organisation as a member rather than keeping its own list.
    facts = ConsortiumFacts(
        model_catalogue=catalogue_keys(),
        member_organisations=member_organisations
        | frozenset(sites.values())
        | {study.get("owner_organisation") or ""},
        site_organisations=sites,
    )
    return check_site_approval(
        consortium,
        site_engine,
        contract,
        datasets,
        owner_principal(study["owner_subject"], study.get("owner_organisation")),
        facts,
        site_id=site_id,
        remaining_epsilon={k: float(v) for k, v in remaining.items()},
        study_id=study_id,
    )
