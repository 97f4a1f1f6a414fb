"""Signed contributions and the aggregate's manifest: which updates an aggregate sums.

Each site's train reply carries a :class:`Contribution` signed with the site's Ed25519 key:
study, contract hash, run attempt, round, the update digest (the SHA-256 of the update's
header, which lists every chunk's digest) and the weight (the site's sample count). A
rogue node cannot make one for a site whose key it does not hold, and a contribution of
another round or study names that round or study.

The ServerApp checks each signature with the key the site enrolled, and sums only signed,
well-formed updates. The aggregate it sends on carries an :class:`AggregateManifest`: the
signed contributions it claims to sum, in site order. A site believes the manifest only
after checking it (:meth:`AggregateManifest.verify`): every signature with the key *it*
pinned for that roster member, every contribution for this study, contract and round, at
least ``min_sites`` of them, and the total weight equal to the sum of the signed weights.
Whether the ciphertexts actually sum to these contributions the manifest cannot say: the
secret tag slots inside the ciphertexts do (``site_node.crypto.tags``).

The signed bytes are a domain label and the canonical JSON of the contribution; the
manifest's JSON is canonical too, so its SHA-256 (:attr:`AggregateManifest.digest`) names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from concord_protocol.canonical import canonical_json
from concord_protocol.errors import ConcordError
from concord_protocol.fields import Sha256Hex, Slug
from concord_protocol.sealed_key import B64Bytes
from concord_protocol.site_keys import SignatureError, verify_ed25519
from concord_protocol.wire.format import sha256_hex

__all__ = [
    "CONTRIBUTION_VERSION",
    "AggregateManifest",
    "Contribution",
    "ManifestError",
    "SignedContribution",
    "sign_contribution",
]

CONTRIBUTION_VERSION: Literal[1] = 1
_LABEL = b"concord/contribution/v1\x00"
#: Largest weight a contribution may name (a sample count; far above any real dataset).
MAX_WEIGHT = 10**9


class ManifestError(ConcordError):
    """An aggregate's manifest cannot be believed. Codes (``aggregate.*``):

    ``aggregate.manifest_malformed`` (does not parse), ``aggregate.wrong_round`` (a
    manifest of another round, study or contract), ``aggregate.duplicate_site`` (a site
    listed twice or out of order), ``aggregate.too_few_sites``, ``aggregate.unknown_site``
    (a site not pinned or not in the roster), ``aggregate.swapped_contribution`` (a listed
    contribution of another round, study or contract), ``aggregate.bad_signature`` (not
    signed by the pinned key), ``aggregate.weight_mismatch`` (the divisor is not the sum of
    the signed weights).
    """

    code = "aggregate.manifest_invalid"


class Contribution(BaseModel):
    """What a site states about the update it sent for one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = CONTRIBUTION_VERSION
    study_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    contract_hash: Sha256Hex
    attempt: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    round_number: int = Field(ge=1)
    site_id: Slug
    update_digest: Sha256Hex
    weight: int = Field(ge=1, le=MAX_WEIGHT)

    def signed_bytes(self) -> bytes:
        """The bytes the site's signature covers."""
        return _LABEL + canonical_json(self.model_dump(mode="json"))


class SignedContribution(BaseModel):
    """A :class:`Contribution` and the site's Ed25519 signature over it (base64)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contribution: Contribution
    signature: B64Bytes

    def verify(self, signing_public_key: str) -> None:
        """Check the signature with the site's key (API form); raises :class:`SignatureError`."""
        c = self.contribution
        verify_ed25519(
            signing_public_key,
            self.signature,
            c.signed_bytes(),
            what=f"contribution of {c.site_id} to round {c.round_number} of {c.study_id}",
        )

    def to_json(self) -> str:
        """Canonical JSON (what a reply's ``site`` record carries)."""
        return canonical_json(self.model_dump(mode="json")).decode()

    @classmethod
    def from_json(cls, text: str) -> SignedContribution:
        """Parse :meth:`to_json`'s output; :class:`ManifestError` if it is not one."""
        return _parse(cls, text, "a signed contribution")


def sign_contribution(
    contribution: Contribution, signing_key: Ed25519PrivateKey
) -> SignedContribution:
    """Sign ``contribution`` with the site's key."""
    return SignedContribution(
        contribution=contribution, signature=signing_key.sign(contribution.signed_bytes())
    )


_M = TypeVar("_M", bound=BaseModel)


def _parse(cls: type[_M], text: str, what: str) -> _M:
    try:
        return cls.model_validate_json(text)
    except (ValidationError, ValueError):
        raise ManifestError(
            f"{what} that does not parse", code="aggregate.manifest_malformed"
        ) from None


class AggregateManifest(BaseModel):
    """The signed contributions an aggregate claims to sum, in site order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = CONTRIBUTION_VERSION
    study_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    contract_hash: Sha256Hex
    round_number: int = Field(ge=1)
    contributions: tuple[SignedContribution, ...]

    @classmethod
    def of(
        cls,
        contributions: Sequence[SignedContribution],
        *,
        study_id: str,
        contract_hash: str,
        round_number: int,
    ) -> AggregateManifest:
        """The manifest of ``contributions`` (sorted by site id)."""
        ordered = sorted(contributions, key=lambda s: s.contribution.site_id)
        return cls(
            study_id=study_id,
            contract_hash=contract_hash,
            round_number=round_number,
            contributions=tuple(ordered),
        )

    @property
    def sites(self) -> tuple[str, ...]:
        """The listed sites, in order."""
        return tuple(s.contribution.site_id for s in self.contributions)

    @property
    def total_weight(self) -> int:
        """The sum of the signed weights: the divisor of the aggregate."""
        return sum(s.contribution.weight for s in self.contributions)

    def contribution_of(self, site_id: str) -> Contribution | None:
        """The listed contribution of ``site_id``, if any."""
        for signed in self.contributions:
            if signed.contribution.site_id == site_id:
                return signed.contribution
        return None

    def to_json(self) -> str:
        """Canonical JSON."""
        return canonical_json(self.model_dump(mode="json")).decode()

    @classmethod
    def from_json(cls, text: str) -> AggregateManifest:
        """Parse :meth:`to_json`'s output; :class:`ManifestError` if it is not a manifest."""
        return _parse(cls, text, "an aggregate manifest")

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON."""
        return sha256_hex(self.to_json().encode())

    def verify(
        self,
        *,
        study_id: str,
        contract_hash: str,
        round_number: int,
        keys: Mapping[str, str],
        min_sites: int,
        total_weight: float | None = None,
    ) -> None:
        """Believe the manifest only if every claim in it checks out.

        ``keys``: site id -> the Ed25519 public key (API form) *this site* pinned for each
        roster member (its own included). ``total_weight``: the divisor the server sent
        with the aggregate, which must be the sum of the signed weights. Raises
        :class:`ManifestError`.
        """
        if (self.study_id, self.contract_hash, self.round_number) != (
            study_id,
            contract_hash,
            round_number,
        ):
            raise ManifestError(
                f"the manifest is for round {self.round_number} of another study or contract, "
                f"not round {round_number} of this one",
                code="aggregate.wrong_round",
            )
        sites = self.sites
        if len(set(sites)) != len(sites) or list(sites) != sorted(sites):
            raise ManifestError(
                "the manifest lists a site twice or out of order", code="aggregate.duplicate_site"
            )
        if len(sites) < min_sites:
            raise ManifestError(
                f"the aggregate sums {len(sites)} contributions, at least {min_sites} needed",
                code="aggregate.too_few_sites",
            )
        for signed in self.contributions:
            c = signed.contribution
            key = keys.get(c.site_id)
            if key is None:
                raise ManifestError(
                    f"the manifest lists {c.site_id!r}, which is not a pinned roster member",
                    code="aggregate.unknown_site",
                )
            if (c.study_id, c.contract_hash, c.round_number) != (
                study_id,
                contract_hash,
                round_number,
            ):
                raise ManifestError(
                    f"{c.site_id}'s listed contribution is for round {c.round_number} of "
                    "another study or contract",
                    code="aggregate.swapped_contribution",
                )
            try:
                signed.verify(key)
            except SignatureError as exc:
                raise ManifestError(exc.message, code="aggregate.bad_signature") from None
        if total_weight is not None and float(total_weight) != float(self.total_weight):
            raise ManifestError(
                f"the aggregate is divided by {total_weight}, the signed weights sum to "
                f"{self.total_weight}",
                code="aggregate.weight_mismatch",
            )
