"""Cedar entities and context built from domain objects.

The policy engine sees only what this module puts in front of it:

* ``Concord::Researcher`` from a :class:`~concord_protocol.principals.Principal`
  (subject, roles, organisation; its parent is the organisation);
* ``Concord::Organisation`` for the researcher's organisation and every site's, with
  ``consortium_member`` from the member set the caller passes;
* ``Concord::Site`` and ``Concord::Dataset`` from the :class:`DatasetFacts` a study names
  (their purposes, per-study epsilon cap, encryption requirement and remaining budget);
* ``Concord::Study`` from the :class:`StudyContract` (purpose, epsilon, ethics reference,
  model, encryption, ``min_sites``) plus counts Cedar cannot compute (distinct sites,
  datasets), since Cedar has no set-size operator;
* the context: the study and the model catalogue (``"name@version"`` strings), plus round
  or release facts for those actions.

Epsilon is a Cedar ``decimal`` with 4 decimal places. Rounding is always conservative:
what a study asks for is rounded **up**, caps and remaining budgets **down**, so rounding
can only make a decision stricter.

Ethics references: the well-formedness flag is computed here with
:func:`~concord_protocol.contract.ethics_reference_well_formed` (the one
definition of the pattern, ``^[A-Z][A-Z0-9]{1,15}-\\d{4}-\\d{1,6}$``) and passed as the
study's ``ethics_reference_well_formed`` boolean: Cedar's ``like`` has only ``*``
wildcards and cannot express "four digits". The raw reference is passed too, so a
policy can add its own ``like`` checks (for example ``like "IRB-*"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from concord_protocol.contract import StudyContract, ethics_reference_well_formed
from concord_protocol.policy.engine import NAMESPACE, EntityUid
from concord_protocol.principals import Principal, Role

__all__ = [
    "ConsortiumFacts",
    "DatasetFacts",
    "StudyFacts",
    "build_study_facts",
    "cedar_decimal",
    "entity_uid",
    "model_key",
    "organisation_principal",
    "owner_principal",
    "round_epsilon_down",
    "round_epsilon_up",
]

#: Cedar decimals carry at most 4 decimal places.
EPSILON_QUANTUM = Decimal("0.0001")

Number = float | int | str | Decimal


def _to_decimal(value: Number) -> Decimal:
    # str() first: Decimal(0.1) would carry the binary expansion of the float.
    return value if isinstance(value, Decimal) else Decimal(str(value))


def round_epsilon_up(value: Number) -> Decimal:
    """Round a requested epsilon up to 4 decimal places (never under-states a request)."""
    return _to_decimal(value).quantize(EPSILON_QUANTUM, rounding=ROUND_CEILING)


def round_epsilon_down(value: Number) -> Decimal:
    """Round a cap or remaining budget down to 4 decimal places (never over-states it)."""
    return _to_decimal(value).quantize(EPSILON_QUANTUM, rounding=ROUND_FLOOR)


def cedar_decimal(value: Number, *, up: bool) -> dict[str, Any]:
    """A Cedar ``decimal`` extension value with 4 places; ``up`` picks the rounding."""
    rounded = round_epsilon_up(value) if up else round_epsilon_down(value)
    return {"__extn": {"fn": "decimal", "arg": format(rounded, "f")}}


def entity_uid(kind: str, identifier: str) -> EntityUid:
    """``entity_uid("Dataset", "bc-a")`` -> ``{"type": "Concord::Dataset", "id": "bc-a"}``."""
    return {"type": f"{NAMESPACE}::{kind}", "id": identifier}


def _ref(kind: str, identifier: str) -> dict[str, Any]:
    return {"__entity": entity_uid(kind, identifier)}


def model_key(name: str, version: str) -> str:
    """How a catalogue model is named to Cedar: ``name@version``."""
    return f"{name}@{version}"


def owner_principal(subject: str, organisation: str | None) -> Principal:
    """The study owner as a principal, for checks made without the owner's token
    (site approval, rounds): the stored subject and organisation, role researcher."""
    return Principal(
        subject=subject,
        roles=frozenset({Role.RESEARCHER}),
        organisation=organisation,
        issuer="concord:study-owner",
    )


def organisation_principal(organisation: str) -> EntityUid:
    """An organisation as the principal of a request (e.g. a site reading a report)."""
    return entity_uid("Organisation", organisation)


@dataclass(frozen=True)
class DatasetFacts:
    """What a policy knows of one catalogue dataset: its site and its governance fields.

    The server builds these from its catalogue rows, a site from the catalogue the API
    returns (:meth:`from_mapping`): the same facts give the same decision on both sides.
    """

    id: str
    site_id: str
    allowed_purposes: tuple[str, ...]
    max_epsilon_per_study: Number
    requires_encryption: bool

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> DatasetFacts:
        """From a catalogue entry as the API serves it (``GET /api/v1/datasets/{id}``)."""
        return cls(
            id=str(row["id"]),
            site_id=str(row["site_id"]),
            allowed_purposes=tuple(str(p) for p in row.get("allowed_purposes", ())),
            max_epsilon_per_study=float(row["max_epsilon_per_study"]),
            requires_encryption=bool(row.get("requires_encryption", True)),
        )


@dataclass(frozen=True)
class ConsortiumFacts:
    """What the consortium knows beyond the study: its model catalogue, its member
    organisations, and which organisation runs each enrolled site."""

    model_catalogue: frozenset[tuple[str, str]]
    member_organisations: frozenset[str]
    site_organisations: Mapping[str, str] = field(default_factory=dict)

    def catalogue_keys(self) -> list[str]:
        """The catalogue as sorted ``name@version`` strings."""
        return sorted(model_key(name, version) for name, version in self.model_catalogue)

    def organisation_of_site(self, site_id: str) -> str:
        """The organisation running ``site_id``; ValueError for an unknown site."""
        try:
            return self.site_organisations[site_id]
        except KeyError:
            raise ValueError(
                f"site {site_id!r} has no known organisation: pass it in site_organisations"
            ) from None


@dataclass
class StudyFacts:
    """Entities and context for the requests about one study."""

    entities: list[dict[str, Any]]
    study: EntityUid
    owner: EntityUid
    datasets: dict[str, EntityUid]
    model_catalogue: list[str]

    def principal(self, principal: Principal) -> EntityUid:
        """The uid of a principal (already among :attr:`entities`)."""
        return entity_uid("Researcher", principal.subject)

    def study_context(self) -> dict[str, Any]:
        """Context of SubmitStudy / UseDataset."""
        return {"study": {"__entity": self.study}, "model_catalogue": list(self.model_catalogue)}

    def round_context(
        self, round_number: int, participating_sites: int, reservation_remaining: Number
    ) -> dict[str, Any]:
        """Context of RunRound."""
        return {
            **self.study_context(),
            "round": int(round_number),
            "participating_sites": int(participating_sites),
            "reservation_remaining": cedar_decimal(reservation_remaining, up=False),
        }


class _EntityBag:
    """Entities keyed by uid (an organisation may appear as researcher's and site's)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, uid: EntityUid, attrs: dict[str, Any], parents: Iterable[EntityUid] = ()) -> None:
        key = (uid["type"], uid["id"])
        if key not in self._items:
            self._items[key] = {"uid": uid, "attrs": attrs, "parents": list(parents)}

    def items(self) -> list[dict[str, Any]]:
        return list(self._items.values())


def _add_organisation(bag: _EntityBag, name: str, facts: ConsortiumFacts) -> EntityUid:
    uid = entity_uid("Organisation", name)
    bag.add(uid, {"consortium_member": name in facts.member_organisations})
    return uid


def _add_researcher(bag: _EntityBag, principal: Principal, facts: ConsortiumFacts) -> EntityUid:
    uid = entity_uid("Researcher", principal.subject)
    attrs: dict[str, Any] = {"roles": sorted(role.value for role in principal.roles)}
    parents: list[EntityUid] = []
    if principal.organisation:
        org = _add_organisation(bag, principal.organisation, facts)
        attrs["organisation"] = {"__entity": org}
        parents.append(org)
    bag.add(uid, attrs, parents)
    return uid


def build_study_facts(
    contract: StudyContract,
    datasets: Sequence[DatasetFacts],
    owner: Principal,
    facts: ConsortiumFacts,
    *,
    remaining_epsilon: Mapping[str, Number],
    study_id: str | None = None,
    state: str = "submitted",
    others: Iterable[Principal] = (),
) -> StudyFacts:
    """Entities for ``contract`` using ``datasets`` (only those the contract names).

    ``remaining_epsilon``: dataset id -> lifetime epsilon left on the ledger
    (:func:`consortium_server.budgets.service.remaining_epsilon`); a dataset missing from
    it counts as having nothing left, so forgetting it denies rather than allows.
    ``study_id``: the study's id (defaults to the contract hash, before submission).
    ``others``: further principals to describe (e.g. whoever asks for a release).
    """
    bag = _EntityBag()
    owner_uid = _add_researcher(bag, owner, facts)
    for other in others:
        _add_researcher(bag, other, facts)
    wanted = set(contract.datasets)
    used = [dataset for dataset in datasets if dataset.id in wanted]
    site_orgs: dict[str, EntityUid] = {}
    dataset_uids: dict[str, EntityUid] = {}
    for dataset in used:
        if dataset.site_id not in site_orgs:
            org = _add_organisation(bag, facts.organisation_of_site(dataset.site_id), facts)
            site_orgs[dataset.site_id] = org
            bag.add(entity_uid("Site", dataset.site_id), {"organisation": {"__entity": org}}, [org])
        uid = entity_uid("Dataset", dataset.id)
        dataset_uids[dataset.id] = uid
        bag.add(
            uid,
            {
                "site": _ref("Site", dataset.site_id),
                "allowed_purposes": sorted(str(p) for p in dataset.allowed_purposes),
                "max_epsilon_per_study": cedar_decimal(dataset.max_epsilon_per_study, up=False),
                "remaining_epsilon": cedar_decimal(remaining_epsilon.get(dataset.id, 0), up=False),
                "requires_encryption": bool(dataset.requires_encryption),
            },
            [entity_uid("Site", dataset.site_id)],
        )
    study_uid = entity_uid("Study", study_id or contract.contract_hash())
    bag.add(
        study_uid,
        {
            "owner": {"__entity": owner_uid},
            "state": state,
            "contract_hash": contract.contract_hash(),
            "purpose": contract.purpose.value,
            "epsilon": cedar_decimal(contract.privacy.epsilon, up=True),
            "ethics_reference": contract.ethics_reference,
            "ethics_reference_well_formed": ethics_reference_well_formed(contract.ethics_reference),
            "encryption_enabled": bool(contract.encryption.enabled),
            "model": model_key(contract.model.name, contract.model.version),
            "min_sites": int(contract.federation.min_sites),
            "rounds": int(contract.training.rounds),
            "site_count": len(site_orgs),
            "dataset_count": len(used),
            "site_organisations": [{"__entity": org} for org in site_orgs.values()],
        },
    )
    return StudyFacts(
        entities=bag.items(),
        study=study_uid,
        owner=owner_uid,
        datasets=dataset_uids,
        model_catalogue=facts.catalogue_keys(),
    )
