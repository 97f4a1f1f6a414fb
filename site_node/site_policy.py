"""A site's own data-use policy, evaluated at the site on top of the consortium's.

The site's policy directory holds Cedar files (start from ``policies/sites/``: the base
permit plus the site's forbid rules). A study may use the site's datasets only if the
consortium policy AND the site policy allow it: the site can tighten, never loosen.
:mod:`site_node.studies` runs :func:`check_study` before every decision (``site-node study
show``/``approve``, and the demo through the same path); :func:`site_engine` loads the set
the site's settings name (the shipped default, ``policies/site-default/``, when none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from concord_protocol.catalogue import catalogue_keys
from concord_protocol.client import ConsortiumClient
from concord_protocol.contract import StudyContract
from concord_protocol.policy.decisions import check_site_approval
from concord_protocol.policy.engine import SCHEMA_FILENAME, Decision, PolicyEngine
from concord_protocol.policy.facts import ConsortiumFacts, DatasetFacts, owner_principal
from concord_protocol.policy.shipped import shipped_policies

__all__ = ["check_study", "load_site_engine", "site_engine"]


def load_site_engine(directory: Path, *, site_id: str, schema: Path | None = None) -> PolicyEngine:
    """The site's policy set, validated against the consortium schema."""
    return PolicyEngine.load(
        directory, schema or shipped_policies() / SCHEMA_FILENAME, label=f"site:{site_id}"
    )


def site_engine(policy_dir: Path | None, *, site_id: str) -> PolicyEngine:
    """The site's own policy: ``policy_dir``, or the shipped default set."""
    return load_site_engine(policy_dir or shipped_policies() / "site-default", site_id=site_id)


def check_study(
    client: ConsortiumClient,
    study: dict[str, Any],
    contract: StudyContract,
    *,
    site_id: str,
    site_engine: PolicyEngine,
    schema: Path | None = None,
    member_organisations: frozenset[str] = frozenset(),
) -> Decision:
    """Evaluate the consortium's active policy and the site's own policy for this site.

    ``study`` is the study as the API served it and ``contract`` its contract, already
    checked against its hash. The rest comes from the API too (the catalogue, the active
    consortium policy, the sites, the budgets): a server that loosened the consortium
    policy or a dataset's entry still meets the site's own policy, which is evaluated here
    and can only deny.
    """
    study_id = str(study["id"])
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
