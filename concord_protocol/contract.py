"""The study contract: what a researcher asks for, declaratively, and the hash sites approve.

This module is the one place both sides agree on. The server stores the contract and its
hash; every site recomputes the hash from the contract it receives and refuses to train on a
contract whose hash its data steward did not approve. It imports nothing of either role.

A researcher submits a :class:`StudyDraft`; the server completes it into the
:class:`StudyContract` with the study's **roster**: each site whose data the study uses,
with the fingerprint of the site's keys (:func:`concord_protocol.site_keys.site_key_fingerprint`)
and the number of examples the site published for the study's datasets, plus the member
that generates the study key. The roster is inside the hash every steward approves, so a
site checks it against the keys it pinned itself: a server cannot slip in a site, swap a
site's keys, or choose who generates the key after the stewards approved.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from concord_protocol.canonical import canonical_json, hashable_problem, sha256_hex
from concord_protocol.disclosure import public
from concord_protocol.eval_histograms import release_noise
from concord_protocol.fields import Sha256Hex, Slug
from concord_protocol.preprocessing import PreprocessingSpec
from concord_protocol.wire.format import EncryptedScheme

__all__ = [
    "CONTRACT_SCHEMA_VERSION",
    "EncryptionSpec",
    "EvaluationSpec",
    "FederationSpec",
    "ModelSpec",
    "PreprocessingSpec",
    "PrivacySpec",
    "Purpose",
    "RosterMember",
    "StudyContract",
    "StudyDraft",
    "TaskKind",
    "TaskSpec",
    "TrainingSpec",
]

CONTRACT_SCHEMA_VERSION = 2

HyperValue = int | float | str | bool


class Purpose(StrEnum):
    """Purposes of use a dataset can allow and a study can declare."""

    DIAGNOSTIC_RESEARCH = "diagnostic_research"
    TREATMENT_RESEARCH = "treatment_research"
    PUBLIC_HEALTH = "public_health"
    QUALITY_IMPROVEMENT = "quality_improvement"
    METHOD_DEVELOPMENT = "method_development"
    COMMERCIAL_RESEARCH = "commercial_research"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A model from the site-side catalogue, by name and version, with its hyperparameters."""

    name: Slug = Field(description="Catalogue name, e.g. `tabular-mlp`.")
    version: Annotated[str, StringConstraints(pattern=r"^\d+(\.\d+){0,2}$")] = Field(
        description="Catalogue version, e.g. `1` or `1.0`."
    )
    hyperparameters: dict[Slug, HyperValue] = Field(
        default_factory=dict, description="Architecture parameters the catalogue entry accepts."
    )

    @field_validator("hyperparameters", mode="before")
    @classmethod
    def _exactly_hashable(cls, value: object) -> object:
        """Refuse numbers the contract hash cannot hold exactly (see
        :func:`~concord_protocol.canonical.hashable_problem`)."""
        if isinstance(value, dict):
            for name, item in value.items():
                problem = hashable_problem(item)
                if problem is not None:
                    raise ValueError(f"{name}: {problem}")
        return value


TaskKind = Literal["classification", "segmentation"]
Loss = Literal["cross_entropy", "dice", "dice_ce"]

#: Each task's losses (the first is the default) and the metrics its evaluation reports.
TASK_LOSSES: dict[str, tuple[Loss, ...]] = {
    "classification": ("cross_entropy",),
    "segmentation": ("dice", "dice_ce"),
}
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "auc"),
    "segmentation": ("dice", "hd95"),
}


class TaskSpec(_Strict):
    """What the model predicts and the loss it trains with.

    ``classification``: one label per record (cross-entropy; accuracy and AUC).
    ``segmentation``: one label per voxel, background being class 0, trained with Dice (the
    default: on small lesions Dice plus cross-entropy can settle on all-background) or Dice
    plus cross-entropy, and evaluated with the mean foreground Dice and the 95th-percentile
    Hausdorff distance (in voxels). The catalogue entry the study names must be of the same
    task.
    """

    kind: TaskKind = Field(default="classification", description="What the model predicts.")
    loss: Loss = Field(
        default="cross_entropy",
        description="Training loss: `cross_entropy` (classification); `dice` (the "
        "segmentation default) or `dice_ce`, Dice plus cross-entropy (segmentation).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_loss(cls, data: object) -> object:
        """A task without a loss trains with its kind's default loss."""
        if isinstance(data, dict) and "loss" not in data:
            kind = data.get("kind", "classification")
            if kind in TASK_LOSSES:
                return {**data, "loss": TASK_LOSSES[kind][0]}
        return data

    @model_validator(mode="after")
    def _loss_suits_task(self) -> TaskSpec:
        if self.loss not in TASK_LOSSES[self.kind]:
            raise ValueError(
                f"loss {self.loss!r} is not a {self.kind} loss; use one of "
                f"{list(TASK_LOSSES[self.kind])}"
            )
        return self

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this task's evaluation reports (round table, report, model card)."""
        return TASK_METRICS[self.kind]


class TrainingSpec(_Strict):
    """How each site trains locally, per round."""

    rounds: int = Field(ge=1, le=500, description="Federated rounds.")
    local_epochs: int = Field(default=1, ge=1, le=50, description="Local epochs per round.")
    batch_size: int = Field(default=64, ge=1, le=8192, description="Expected batch size.")
    learning_rate: float = Field(default=0.05, gt=0, le=10, description="Optimizer step size.")
    optimizer: Literal["sgd", "adam"] = Field(default="sgd", description="Local optimizer.")


class PrivacySpec(_Strict):
    """Differential-privacy target over the whole study, per site (Opacus DP-SGD)."""

    epsilon: float = Field(gt=0, le=100, description="Target epsilon for the whole study.")
    delta: float = Field(gt=0, le=1e-2, description="Target delta for the whole study.")
    max_grad_norm: float = Field(
        default=1.0, gt=0, le=100, description="Per-sample gradient clipping norm."
    )


class FederationSpec(_Strict):
    """How the federation runs."""

    min_sites: int = Field(default=3, ge=1, le=1000, description="Sites needed per aggregation.")
    round_timeout_s: int = Field(
        default=600, ge=5, le=86_400, description="Seconds to wait for sites each round."
    )


class EncryptionSpec(_Strict):
    """Homomorphic encryption of model updates."""

    enabled: bool = Field(default=True, description="Encrypt updates with CKKS (TenSEAL).")
    scheme: EncryptedScheme = Field(
        default="ckks",
        description=(
            "Ciphertext format: `ckks` (TenSEAL vectors, about 32 bytes per parameter) or "
            "`ckks_seeded` (seeded, bit-packed ciphertexts, about 7.5 bytes per parameter)."
        ),
    )


class EvaluationSpec(_Strict):
    """What each site releases about its test split after a round, and at what privacy cost.

    ``dp_histogram`` (the default): each site scores the round's aggregate on its test
    split and releases one histogram of counts, Gaussian noise added to every cell: for a
    binary task, records per (true label, score bin of the positive class, ``score_bins``
    equal bins of [0, 1]); for more classes, records per (true label, predicted label). Each
    record falls in one cell, so one record changes the histogram by 1 in one cell (L2
    sensitivity 1 under adding or removing a record): a Gaussian mechanism that the site's
    accountant composes with its DP-SGD steps, one release per round it trained, all inside
    the study's (epsilon, delta). Accuracy, AUC and the test count are computed from the
    summed noisy histograms (:mod:`concord_protocol.eval_histograms`). ``none``: sites
    release no evaluation at all.

    The noise is ``noise_multiplier`` when given, else the level at which the study's
    ``rounds`` releases *alone* would cost ``epsilon_share`` of its epsilon (at its delta);
    composed with training they cost less, and the training noise is raised just enough to
    keep the whole study within its target.
    """

    mode: Literal["dp_histogram", "none"] = Field(
        default="dp_histogram", description="Noisy test-split histogram per round, or nothing."
    )
    epsilon_share: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Share of the study's epsilon the releases alone may cost (sets the noise).",
    )
    noise_multiplier: float | None = Field(
        default=None,
        ge=0.5,
        le=10_000,
        description="Noise standard deviation on each count (overrides epsilon_share).",
    )
    score_bins: int = Field(
        default=4, ge=2, le=50, description="Binary tasks: score bins (even, so 0.5 is an edge)."
    )

    @field_validator("score_bins")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("score_bins must be even (0.5 must be a bin edge)")
        return value

    @property
    def releases(self) -> bool:
        """True when each round releases a noisy histogram."""
        return self.mode == "dp_histogram"

    def noise(self, privacy: PrivacySpec, rounds: int) -> float | None:
        """Noise of each release for a study of ``rounds`` rounds (None: no releases)."""
        if not self.releases:
            return None
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return release_noise(self.epsilon_share * privacy.epsilon, privacy.delta, rounds)


class RosterMember(_Strict):
    """A site of the study, as every steward approves it."""

    site_id: Slug
    key_fingerprint: Sha256Hex = Field(
        description="Fingerprint of the site's signing and exchange keys (what peers pinned)."
    )
    max_examples: int = Field(
        ge=1,
        le=1_000_000_000,
        description="Records the site published for the study's datasets: the most weight "
        "its update may carry in an aggregate.",
    )


class _StudyBody(_Strict):
    """What a researcher writes: the study without its roster."""

    title: Annotated[str, StringConstraints(min_length=3, max_length=200, strip_whitespace=True)]
    description: Annotated[str, StringConstraints(max_length=5000)] = ""
    purpose: Purpose
    ethics_reference: Annotated[
        str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)
    ] = Field(description="IRB / ethics committee approval reference, e.g. `IRB-2026-0142`.")
    datasets: list[Slug] = Field(min_length=1, max_length=100, description="Catalogue dataset ids.")
    task: TaskSpec = TaskSpec()
    preprocessing: PreprocessingSpec = Field(
        default=PreprocessingSpec(),
        description="Allow-listed image transforms with declared parameters, applied at "
        "every site before training (concord_protocol.preprocessing); none by default.",
    )
    model: ModelSpec
    training: TrainingSpec
    privacy: PrivacySpec
    federation: FederationSpec = FederationSpec()
    encryption: EncryptionSpec = EncryptionSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    public_fields: list[str] = Field(
        default_factory=public,
        description="What each site releases without DP (concord_protocol.disclosure): "
        "inside the hash, so every steward approves it with the study.",
    )

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``task`` and ``preprocessing`` out while they are the defaults
        (classification, no steps): contracts written before studies named them keep their
        canonical form, so the hash each steward approved still matches."""
        data: dict[str, Any] = handler(self)
        if self.task == TaskSpec():
            data.pop("task", None)
        if not self.preprocessing.steps:
            data.pop("preprocessing", None)
        return data

    @field_validator("public_fields")
    @classmethod
    def _declared_public(cls, value: list[str]) -> list[str]:
        if value != public():
            raise ValueError(
                "public_fields must be exactly what sites release without DP: "
                + "; ".join(public())
            )
        return value

    def evaluation_noise(self) -> float | None:
        """Noise of each evaluation release of this study (None: it releases none)."""
        return self.evaluation.noise(self.privacy, self.training.rounds)

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, value: list[str]) -> list[str]:
        duplicates = sorted({d for d in value if value.count(d) > 1})
        if duplicates:
            raise ValueError(f"datasets listed more than once: {', '.join(duplicates)}")
        return value


class StudyDraft(_StudyBody):
    """A study as a researcher submits it; the server adds the roster (:meth:`complete`).

    A draft may carry a roster and key generator already (a researcher who checked the
    site directory); the server then refuses it unless they are the ones it would add.
    """

    schema_version: Literal[2] = 2
    roster: list[RosterMember] | None = None
    key_generator: Slug | None = None

    def complete(self, roster: list[RosterMember], key_generator: str) -> StudyContract:
        """The contract with ``roster`` and ``key_generator``; raises pydantic errors."""
        body = self.model_dump(mode="json", exclude={"roster", "key_generator"})
        return StudyContract.model_validate(
            body
            | {
                "roster": [m.model_dump(mode="json") for m in roster],
                "key_generator": key_generator,
            }
        )


class StudyContract(_StudyBody):
    """A declarative study: everything a site needs to decide, and nothing executable."""

    schema_version: Literal[2] = 2
    roster: list[RosterMember] = Field(
        min_length=1, max_length=1000, description="The study's sites, sorted by site id."
    )
    key_generator: Slug = Field(description="The roster member that generates the study key.")

    @model_validator(mode="after")
    def _roster_is_consistent(self) -> StudyContract:
        ids = [m.site_id for m in self.roster]
        if ids != sorted(set(ids)):
            raise ValueError("roster: site ids must be unique and sorted")
        if self.key_generator not in ids:
            raise ValueError(f"key_generator {self.key_generator!r} is not in the roster")
        return self

    def member(self, site_id: str) -> RosterMember | None:
        """The roster entry of ``site_id`` (None when the site is not in the study)."""
        return next((m for m in self.roster if m.site_id == site_id), None)

    @property
    def site_ids(self) -> tuple[str, ...]:
        """The roster's site ids, sorted."""
        return tuple(m.site_id for m in self.roster)

    def canonical(self) -> bytes:
        """RFC 8785 canonical JSON of the full contract (defaults included)."""
        return canonical_json(self.model_dump(mode="json"))

    def contract_hash(self) -> str:
        """SHA-256 (hex) of :meth:`canonical`: the value each site approves."""
        return sha256_hex(self.model_dump(mode="json"))


ETHICS_REFERENCE_PATTERN = re.compile(r"^[A-Z][A-Z0-9]{1,15}-\d{4}-\d{1,6}$")


def ethics_reference_well_formed(reference: str) -> bool:
    """True for references like ``IRB-2026-0142`` or ``ETHK-2025-17``."""
    return bool(ETHICS_REFERENCE_PATTERN.match(reference))


def contract_from_mapping(data: dict[str, Any]) -> StudyContract:
    """Validate a mapping (parsed from YAML/JSON) into a contract; raises pydantic errors."""
    return StudyContract.model_validate(data)
