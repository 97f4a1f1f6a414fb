"""Build a small consortium through the API: three hospitals, their datasets, people.

Used by API tests and the demo tests; everything goes through HTTP so the same code paths
are exercised as in production.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

Headers = dict[str, str]
Mint = Callable[..., str]


def _raw_b64(public_key: ed25519.Ed25519PublicKey | x25519.X25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


#: The private signing key of every site enrolled through :func:`site_enrolment`, by its
#: public key (API form): what the site itself would hold, for tests that sign as a site.
SIGNING_KEYS: dict[str, ed25519.Ed25519PrivateKey] = {}


def site_enrolment(site_id: str, organisation: str) -> dict[str, Any]:
    """A valid enrolment body with the site's test keys (:func:`tests.support.roster.site_keys`:
    the same keys its state dir gets) and a fresh SuperNode key; the signing key is also
    kept in :data:`SIGNING_KEYS`."""
    from tests.support.roster import site_keys

    supernode = ec.generate_private_key(ec.SECP384R1()).public_key()
    keys = site_keys(site_id)
    SIGNING_KEYS[keys.signing_public_b64] = keys.signing_key
    return {
        "id": site_id,
        "organisation": organisation,
        "display_name": organisation,
        "contact_email": f"it@{site_id}.example.org",
        "signing_public_key": keys.signing_public_b64,
        "exchange_public_key": keys.exchange_public_b64,
        "supernode_public_key": supernode.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode(),
    }


def signed_approval(
    client: Any,
    headers: Headers,
    study: dict[str, Any],
    site_id: str,
    decision: str = "approved",
    reason: str = "",
    *,
    contract_hash: str | None = None,
) -> dict[str, Any]:
    """The approval body ``site-node study approve`` would post: the decision signed with
    the site's current key (looked up in the directory, then in :data:`SIGNING_KEYS`)."""
    from concord_protocol.fields import format_utc, utcnow
    from concord_protocol.site_decisions import SiteDecision, sign_decision

    site = client.get(f"/api/v1/sites/{site_id}", headers=headers).json()
    signed = sign_decision(
        SiteDecision(
            study_id=study["id"],
            contract_hash=contract_hash or study["contract_hash"],
            site_id=site_id,
            decision=decision,
            reason=reason,
            decided_at=format_utc(utcnow()),
        ),
        SIGNING_KEYS[site["signing_public_key"]],
    )
    d = signed.decision
    return {
        "site_id": d.site_id,
        "contract_hash": d.contract_hash,
        "decision": d.decision,
        "reason": d.reason,
        "decided_at": d.decided_at,
        "signature": signed.model_dump(mode="json")["signature"],
    }


def dataset_body(dataset_id: str, site_id: str, **overrides: Any) -> dict[str, Any]:
    """A valid catalogue entry for ``site_id``."""
    body: dict[str, Any] = {
        "id": dataset_id,
        "site_id": site_id,
        "title": f"Breast cancer biopsies ({site_id})",
        "description": "Fine-needle aspirate features, Wisconsin diagnostic.",
        "modality": "tabular",
        "task": "binary_classification",
        "record_count": 190,
        "feature_summary": {"features": 30, "labels": {"benign": 120, "malignant": 70}},
        "allowed_purposes": ["diagnostic_research", "method_development"],
        "epsilon_budget": 10.0,
        "delta_budget": 1e-4,
        "max_epsilon_per_study": 5.0,
        "requires_encryption": True,
        "controller": f"{site_id} hospital trust",
        "data_categories": ["health data"],
        "legal_basis": "GDPR Art. 9(2)(j)",
        "retention": "10 years",
    }
    body.update(overrides)
    return body


def study_contract(datasets: list[str], **overrides: Any) -> dict[str, Any]:
    """A valid study contract over ``datasets``."""
    contract: dict[str, Any] = {
        "title": "Malignancy from FNA features",
        "description": "Federated logistic model across three hospitals.",
        "purpose": "diagnostic_research",
        "ethics_reference": "IRB-2026-0142",
        "datasets": datasets,
        "model": {"name": "tabular-mlp", "version": "1", "hyperparameters": {"hidden": 16}},
        "training": {"rounds": 3, "local_epochs": 1, "batch_size": 64, "learning_rate": 0.1},
        "privacy": {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "federation": {"min_sites": 3, "round_timeout_s": 120},
        "encryption": {"enabled": True},
    }
    contract.update(overrides)
    return contract


@dataclass
class People:
    """Bearer headers for everyone in the test consortium."""

    mint: Mint
    cache: dict[str, Headers] = field(default_factory=dict)

    def headers(self, subject: str, roles: list[str], organisation: str | None) -> Headers:
        key = f"{subject}|{','.join(roles)}|{organisation}"
        if key not in self.cache:
            token = self.mint(subject=subject, roles=roles, organisation=organisation)
            self.cache[key] = {"Authorization": f"Bearer {token}"}
        return self.cache[key]

    @property
    def admin(self) -> Headers:
        return self.headers("olga-operator", ["consortium_admin"], "Consortium office")

    @property
    def researcher(self) -> Headers:
        return self.headers("rita-researcher", ["researcher"], "University of Leiden")

    @property
    def other_researcher(self) -> Headers:
        return self.headers("oscar-researcher", ["researcher"], "University of Ghent")

    @property
    def compliance(self) -> Headers:
        return self.headers("carla-compliance", ["compliance_officer"], "Consortium office")

    def steward(self, site: str) -> Headers:
        return self.headers(f"steward-{site}", ["data_steward"], f"Hospital {site}")

    def node(self, site: str) -> Headers:
        return self.headers(f"service-account-{site}", ["site_node"], f"Hospital {site}")


SITES = ("a", "b", "c")


def build_consortium(client: Any, people: People, *, sites: tuple[str, ...] = SITES) -> None:
    """Enrol ``sites`` (ids hospital-<x>) and publish one dataset each (bc-<x>)."""
    for site in sites:
        response = client.post(
            "/api/v1/sites",
            json=site_enrolment(f"hospital-{site}", f"Hospital {site}"),
            headers=people.admin,
        )
        assert response.status_code == 201, response.text
        response = client.post(
            "/api/v1/datasets",
            json=dataset_body(f"bc-{site}", f"hospital-{site}"),
            headers=people.steward(site),
        )
        assert response.status_code == 201, response.text
