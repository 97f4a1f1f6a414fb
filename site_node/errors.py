"""The site node's error root, its catalogue of codes, and the domain errors of data and training.

Every error the site node raises on purpose derives from :class:`SiteError` and is built the
same way, ``SomeError(message, *, code=..., hint=...)``: the class sets its default ``code``
and a caller may name a more specific one. Every code is in :data:`CATALOGUE`, with what it
means for the operator; :class:`SiteError` refuses any other (so a typo fails in tests, not
in an audit entry), as the server's ``DomainError`` does with its catalogue. Callers (the
ClientApp, the agent, the CLI, the ServerApp reading error replies) switch on ``code``, never
on the message.

The message says what went wrong in terms a hospital IT person or data steward can act on,
and :meth:`SiteError.diagnostics` adds what to do next. Messages never contain patient data
or tensor values: at most file names, column names, counts and shapes.

Where each family lives: data, model, training and privacy errors below;
:mod:`site_node.crypto.errors` (updates, sealed keys, key files);
:mod:`site_node.federation.approvals` (``ApprovalError``), :mod:`~site_node.federation.mods`
(``GuardRefusalError``), :mod:`~site_node.federation.clientapp` (``FederationError``),
:mod:`~site_node.federation.processes` (``BundleRefusedError``),
:mod:`~site_node.federation.warm.shim` (``RunnerUnavailableError``),
:mod:`site_node.agent.sync` (``AgentError``), :mod:`~site_node.agent.cosigner`
(``WitnessRefusedError``) and :mod:`site_node.release` (``ReleaseError``). Errors of the
shared code (:mod:`concord_protocol.errors`: wire format, contexts, the model catalogue, the
API client) are not site errors; site code catches them where it needs to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from concord_protocol.errors import ConcordError

__all__ = [
    "CATALOGUE",
    "AccountantStateError",
    "DatasetConfigError",
    "DatasetError",
    "DatasetIndexError",
    "DatasetMismatchError",
    "EmptyDatasetError",
    "MessageRefusedError",
    "MissingColumnError",
    "MissingFileError",
    "NonNumericValueError",
    "ParameterShapeError",
    "PathOutsideDatasetError",
    "PreprocessingError",
    "PrivacyBudgetExhaustedError",
    "PrivacyConfigurationError",
    "ShapeMismatchError",
    "SiteError",
    "TrainingDeviceError",
    "TrainingDivergedError",
    "UndeclaredLabelValueError",
    "UnknownLabelError",
    "UnreadableFileError",
]

#: Every code a site error may carry, with what it means for the site's operator. Codes are
#: stable: the ClientApp's error replies (``contract.*``, ``study.*``, ``update.*``, ``site.*``,
#: ``bundle.*``) are recorded by the ServerApp and in the audit log.
CATALOGUE: dict[str, str] = {
    "site.error": "The site node failed; the message says where.",
    "training.device_unavailable": "The training device the site is configured with "
    "(`CONCORD_SITE_DEVICE`) is not on this machine: no CUDA, or no GPU of that index.",
    "settings.unsafe_production": "Production refuses plain HTTP, TLS off or a missing CA; "
    "the message names each setting and its fix.",
    # local datasets
    "data.invalid": "A local dataset cannot be loaded as configured; fix the file or its entry.",
    "data.invalid_config": "The dataset configuration is inconsistent; fix the datasets file.",
    "data.missing_file": "A file named by the dataset configuration or labels file is missing.",
    "data.empty": "The dataset (or the requested split) holds no records.",
    "data.missing_column": "A required column (label, filename) is absent from the data.",
    "data.non_numeric": "A feature column holds values that are not numbers.",
    "data.unknown_label": "A label is not one of the configured classes.",
    "data.unreadable": "A file cannot be decoded as the configured format (NIfTI, DICOM, "
    "image); the message names the file.",
    "data.invalid_index": "The dataset's index (a Decathlon `dataset.json`) is malformed; "
    "the message names the field.",
    "data.path_outside": "A path in the dataset's index or labels file leads outside the "
    "dataset folder (`..`, an absolute path, a link out).",
    "data.duplicate_record": "Two entries of the dataset's index have the same record id.",
    "data.shape_mismatch": "An image and its label map, or an image and its declared "
    "channels, disagree in shape; the message names the file.",
    "data.undeclared_label_value": "A label map holds a value that is not one of the labels "
    "its index declares; the message names the file, never the value.",
    "data.mixed_series": "A DICOM series folder holds slices of more than one series.",
    "data.preprocessing_unsupported": "The study declares preprocessing that this dataset's "
    "kind cannot apply (tabular data, 2D images, central slices, demo data).",
    "data.preprocessing_mismatch": "The study's preprocessing does not fit the dataset: "
    "other spatial axes than its images have, or records of another shape than the "
    "contract fixes.",
    # models, training and privacy
    "model.parameter_shape": "A parameter vector does not match the model; check the version.",
    "training.dataset_mismatch": "The dataset changed since the study's privacy state was made.",
    "training.diverged": "Training produced non-finite losses or weights; check the settings.",
    "privacy.invalid_config": "The privacy target cannot be met with this training plan.",
    "privacy.budget_exhausted": "One more round would exceed the site's privacy budget.",
    "privacy.invalid_state": "The saved privacy accountant state is damaged or of another study.",
    # updates and keys (site_node.crypto.errors)
    "update.non_finite": "The update holds NaN or infinite values; it was not encrypted.",
    "update.length_mismatch": "The update does not have the number of parameters expected.",
    "update.bad_shape": "The update is not a flat vector of parameters.",
    "update.bad_dtype": "The update does not hold real numbers.",
    "update.out_of_range": "Weighted values would overflow the encryption's plaintext space.",
    "update.invalid_weight": "The update's weight is not a finite positive number.",
    "sealed_key.invalid": "A sealed study key was refused.",
    "sealed_key.malformed": "The sealed study key is malformed.",
    "sealed_key.wrong_recipient": "The sealed study key is addressed to another site.",
    "sealed_key.wrong_study": "The sealed study key belongs to another study.",
    "sealed_key.wrong_contract": "The sealed study key was made for another contract.",
    "sealed_key.bad_signature": "The sealed study key is not signed by the sending site's key.",
    "sealed_key.decrypt_failed": "The sealed study key cannot be opened with this site's key.",
    "sealed_key.public_context_mismatch": "The study key does not match the study's context.",
    "sealed_key.fingerprint_mismatch": "The study key does not match its fingerprint.",
    "keys.invalid": "A site key file is not a key of the expected type.",
    "keys.missing": "A site key file is missing; run `site-node keys init`.",
    "keys.insecure_permissions": "A site key file is readable by others; chmod 600 it.",
    "keys.exists": "A site key file exists; it is never overwritten.",
    # local approvals (site_node.federation.approvals)
    "approval.invalid": "A local approval or study key cannot be stored or read.",
    "approval.bad_id": "The study id is not a safe file name.",
    "approval.bad_hash": "Not a SHA-256 hash (64 lower-case hex digits).",
    "approval.hash_mismatch": "The contract does not hash to the approved value.",
    "approval.corrupt": "A stored approval or study key was altered; restore it from backup.",
    "approval.key_permissions": "The stored study key is readable by others; chmod 600 it.",
    "approval.bad_clientapp": "Not a ClientApp reference (module.path:attribute).",
    # refusals in the ClientApp's error replies (site_node.federation)
    "federation.refused": "The site cannot serve this message; the message says why.",
    "contract.not_approved": "The site has not approved the run's contract.",
    "contract.hash_mismatch": "The run's contract is malformed or does not hash to its id.",
    "contract.wrong_study": "The contract hash was approved for another study.",
    "contract.content_mismatch": "The round's content names another study or contract.",
    "study.no_key": "The site has no key for the study yet; let the agent exchange it.",
    "site.datasets_file": "The site's datasets file does not hold a list of datasets.",
    "site.no_datasets": "The SuperNode has no datasets file configured.",
    "site.no_study_dataset": "None of the study's datasets is registered at this site.",
    "site.no_signing_key": "The site's signing key cannot be read (`site-node keys init`); "
    "train replies are signed with it.",
    "update.global_mismatch": "The global model sent is for another round, study or scheme.",
    "update.no_global": "An evaluate message came without the global model.",
    "aggregate.integrity_failed": (
        "The aggregate is not the sum of the contributions it lists (a tag is off): it was "
        "refused, nothing was trained on, evaluated or released from it."
    ),
    "aggregate.tags_missing": "The aggregate carries no (or the wrong number of) tags.",
    "aggregate.manifest_missing": "The aggregate came without its manifest of contributions.",
    "aggregate.manifest_invalid": "The aggregate's manifest of contributions does not hold up.",
    "aggregate.manifest_malformed": "The aggregate's manifest does not parse.",
    "aggregate.wrong_round": "The aggregate's manifest is for another round or study.",
    "aggregate.duplicate_site": "The aggregate's manifest lists a site twice.",
    "aggregate.too_few_sites": "The aggregate lists fewer sites than the study's minimum.",
    "aggregate.mixed_runs": "The aggregate's contributions come from different runs.",
    "aggregate.swapped_contribution": "A listed contribution is for another round or study.",
    "aggregate.unknown_site": "The aggregate lists a site that is not on the roster.",
    "aggregate.weight_exceeds_roster": "A listed weight exceeds what the site published.",
    "aggregate.bad_signature": "A listed contribution is not signed by its site's key.",
    "aggregate.weight_mismatch": "The total weight sent is not the sum of the signed weights.",
    "aggregate.round_locked": (
        "An earlier aggregate of this round failed its integrity tags: the site opens no "
        "other aggregate of the round (the tags are one-time keys; each refusal would tell "
        "a forger one more bit)."
    ),
    "aggregate.own_contribution_omitted": (
        "The aggregate leaves out this site's own timely contribution to that round."
    ),
    "contribution.malformed": "A signed contribution does not parse.",
    "evaluation.already_answered": (
        "This site already evaluated another aggregate for that round: one answer per round."
    ),
    "evaluation.not_trained": (
        "This site did not train that round, so no evaluation release is budgeted for it."
    ),
    "evaluation.not_in_contract": "The study's contract releases no evaluation (mode none).",
    "release.not_on_record": (
        "The aggregate offered for release is not the final round's in the audit log."
    ),
    "release.not_witnessed": (
        "The final round's audit entry is newer than the last head this site witnessed."
    ),
    "release.not_final": (
        "The aggregate offered for release is not the final round's verified aggregate."
    ),
    "compare.encryption_required": "The contract requires encryption; SecAgg+ would not do.",
    "bundle.not_allowed": "The run's app bundle hash is not allowed at this site.",
    "bundle.extra_files": "The run's app bundle holds files other than its configuration.",
    "bundle.unreadable": "The run's app bundle is not a readable FAB.",
    "bundle.wrong_clientapp": "The bundle names another ClientApp than the site allowed.",
    "bundle.not_clientapp": "The allowed reference does not name a Flower ClientApp.",
    "bundle.unchecked": "No checked app bundle: no ClientApp is loaded.",
    "runner.unavailable": "The warm ClientApp runner did not take the message (in-process).",
    "supernode.unsafe_args": "site-node supernode refuses flower-supernode arguments that let "
    "it start apps itself (--isolation subprocess) or open its runtime API beyond loopback.",
    # the site agent (site_node.agent)
    "agent.refused": "The site agent refused what the server sent, or cannot act.",
    "agent.no_credentials": "No credentials for the consortium API; set CONCORD_SITE_*.",
    "agent.no_site_id": "The site id is not set; set CONCORD_SITE_SITE_ID.",
    "agent.contract_invalid": "The server sent a contract that is not a valid study contract.",
    "agent.contract_hash_mismatch": "The study's contract does not hash to its contract hash.",
    "agent.approval_hash_mismatch": "This site approved another contract hash than the study's.",
    "agent.no_approved_sites": "The study has no approved site.",
    "agent.site_not_active": "A site of the study is not an active enrolled site.",
    "agent.keys_not_enrolled": "This site's signing key is not the one enrolled; re-enrol it.",
    "agent.study_key_lost": "This site relayed the study key but no longer holds it.",
    "agent.fingerprint_mismatch": "The relayed study key's fingerprint does not match.",
    "agent.key_sender_not_approved": "The study key was sent by a site not approved for it.",
    "agent.sender_key_mismatch": "The relay names another signing key than the enrolment.",
    "agent.relay_malformed": "The relayed study key is malformed.",
    "agent.no_server_key": "No trusted tree-head key yet; set CONCORD_SITE_SERVER_HEAD_KEY.",
    "agent.server_key_changed": "The server signs tree heads with another key than trusted.",
    "agent.log_id_invalid": "The server names its audit log with something that is no log id.",
    "agent.log_id_changed": "The server names its audit log otherwise than this site pinned.",
    # the audit witness (site_node.agent.cosigner)
    "audit.tree_inconsistent": "The log's new head does not extend the head this site cosigned.",
    "audit.tree_shrunk": "The log is smaller than the head this site cosigned.",
    "audit.head_stale": "The head is older than the head this site cosigned.",
    "audit.witness_state_invalid": "The witness state file is damaged or of another log.",
    "audit.key_invalid": "The server's tree-head key is not a valid Ed25519 key.",
    "audit.head_signature_invalid": "The tree head is not signed by the server's trusted key.",
    "audit.cosignature_invalid": "A cosignature does not verify with the site's key.",
    # pinned peers and the study roster (site_node.peers)
    "peers.invalid": "A peer cannot be pinned as asked; the message says why.",
    "peers.corrupt": "The pinned peers file is damaged or was altered; restore it or re-pin.",
    "peers.fingerprint_mismatch": "The directory's keys for the peer do not have the "
    "fingerprint you confirmed: nothing was pinned.",
    "peers.key_mismatch": "A pinned peer's published keys changed without a signed rotation "
    "from the pinned key; its studies get no keys here until it is pinned again.",
    "peers.not_pinned": "The site is not pinned here; pin it first (site-node peers pin).",
    "keys.fingerprint_invalid": "Not a key fingerprint (64 hexadecimal digits).",
    "keys.rotation_invalid": "The key rotation does not chain from the pinned keys.",
    "signature.invalid": "A signature does not verify with the key this site pinned.",
    "signature.key_invalid": "A public key is malformed.",
    # reviewing and deciding on studies at the site (site_node.studies)
    "study.refused": "The site refuses the study; the problems say why.",
    "study.not_reviewed": "The hash given is not the study's current contract hash.",
    "study.already_decided": "This site already decided on the study.",
    "study.not_decidable": "The study is not awaiting approvals.",
    "roster.not_member": "This site is not in the study's roster.",
    "roster.own_key_mismatch": "The roster names other keys for this site than it holds.",
    "roster.unpinned": "A roster member is not pinned here.",
    "roster.key_mismatch": "The roster names other keys for a member than the pinned ones.",
    "roster.bad_key_generator": "The key generator named by the contract is not in the roster.",
    # signing off the final model (site_node.release)
    "release.refused": "The site refuses to sign off the final model.",
    "release.malformed": "The final aggregate is malformed.",
    "release.not_approved": "This site did not approve the study's contract.",
    "release.mismatch": "The final aggregate does not match the study's contract.",
    "release.no_key": "This site has no key for the study.",
    "release.decrypt": "The final aggregate cannot be decrypted with the study key.",
    "release.layout_mismatch": "The input shape the server names for the model does not give "
    "the contract's network the decrypted model's parameter count: the model is not uploaded.",
}


def _check_code(code: str, where: str) -> None:
    if code not in CATALOGUE:
        raise ValueError(f"unknown site error code {code!r} ({where}): add it to CATALOGUE")


class SiteError(ConcordError):
    """Base class of the site node's errors: ``SiteError(message, *, code=..., hint=...)``.

    Attributes:
        code: stable machine-readable identifier in :data:`CATALOGUE`, e.g.
            ``"data.missing_column"``; each class sets a default.
        message: what went wrong, safe to show and log.
        hint: optional next step for the operator (:meth:`diagnostics` adds it).

    Raises ValueError for a code that is not in :data:`CATALOGUE` (a class whose default
    is not in it fails when it is defined).
    """

    code = "site.error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_code(cls.code, f"default of {cls.__qualname__}")

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        details: Sequence[Mapping[str, Any]] = (),
        hint: str | None = None,
    ) -> None:
        if code is not None:
            _check_code(code, type(self).__qualname__)
        super().__init__(message, code=code, details=details, hint=hint)


class MessageRefusedError(SiteError):
    """The site refuses to serve a Flower message; ``str()`` leads with the code.

    Flower makes a ClientApp's exception the error reply's reason (``str(exc)``), which the
    ServerApp records (and the audit log keeps): so the reason is ``"<code>: <message>"``
    and the code survives the trip, e.g. ``contract.not_approved: ...``.
    """

    code = "federation.refused"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


# --- data -----------------------------------------------------------------------------------


class DatasetError(SiteError):
    """A local dataset cannot be loaded as configured."""

    code = "data.invalid"


class DatasetConfigError(DatasetError):
    """The dataset configuration itself is inconsistent (e.g. a file kind without a path)."""

    code = "data.invalid_config"


class MissingFileError(DatasetError):
    """A file named by the configuration or by a labels file does not exist."""

    code = "data.missing_file"


class EmptyDatasetError(DatasetError):
    """The source holds no records (or none left for the requested split)."""

    code = "data.empty"


class MissingColumnError(DatasetError):
    """A required column (the label column, ``filename``) is absent."""

    code = "data.missing_column"


class NonNumericValueError(DatasetError):
    """A feature column holds values that are not numbers."""

    code = "data.non_numeric"


class UnknownLabelError(DatasetError):
    """A label is not one of the configured classes."""

    code = "data.unknown_label"


class UndeclaredLabelValueError(UnknownLabelError):
    """A label map holds a voxel value that its index does not declare."""

    code = "data.undeclared_label_value"


class UnreadableFileError(DatasetError):
    """A file cannot be decoded as the format its configuration names."""

    code = "data.unreadable"


class DatasetIndexError(DatasetError):
    """A dataset's index file (a Decathlon ``dataset.json``) is malformed."""

    code = "data.invalid_index"


class PathOutsideDatasetError(DatasetError):
    """A path named by an index or labels file leads outside the dataset folder."""

    code = "data.path_outside"


class ShapeMismatchError(DatasetError):
    """An image and its label map (or its declared channels) disagree in shape."""

    code = "data.shape_mismatch"


class PreprocessingError(DatasetError):
    """The study's declared preprocessing does not fit the dataset (or its kind)."""

    code = "data.preprocessing_mismatch"


# --- models ---------------------------------------------------------------------------------


class ParameterShapeError(SiteError):
    """A parameter vector does not match the model's parameters."""

    code = "model.parameter_shape"


# --- training and privacy -------------------------------------------------------------------


class DatasetMismatchError(SiteError):
    """The dataset given to a round is not the one the privacy accountant was built for."""

    code = "training.dataset_mismatch"


class TrainingDivergedError(SiteError):
    """Training produced non-finite losses or weights."""

    code = "training.diverged"


class TrainingDeviceError(SiteError):
    """The configured training device (``CONCORD_SITE_DEVICE``) is not on this machine."""

    code = "training.device_unavailable"


class PrivacyConfigurationError(SiteError):
    """The privacy target cannot be met with this training plan (or is malformed)."""

    code = "privacy.invalid_config"


class PrivacyBudgetExhaustedError(SiteError):
    """Running one more round would take the site past its target epsilon."""

    code = "privacy.budget_exhausted"


class AccountantStateError(SiteError):
    """A saved accountant state is malformed or belongs to another study/dataset."""

    code = "privacy.invalid_state"
