"""Site-side domain errors, each with a stable ``code``.

Every error the site node raises on purpose derives from :class:`SiteError`. The ``code`` is
stable (callers, the ClientApp and the CLI may switch on it); the message says what went wrong
in terms a hospital IT person or data steward can act on, and :meth:`SiteError.diagnostics`
adds what to do next. Messages never contain patient data or tensor values: at most file
names, column names, counts and shapes.
"""

from __future__ import annotations

from concord_protocol.errors import ConcordError

__all__ = [
    "AccountantStateError",
    "DatasetConfigError",
    "DatasetError",
    "DatasetMismatchError",
    "EmptyDatasetError",
    "MissingColumnError",
    "MissingFileError",
    "NonNumericValueError",
    "ParameterShapeError",
    "PrivacyBudgetExhaustedError",
    "PrivacyConfigurationError",
    "SiteError",
    "TrainingDivergedError",
    "UnknownLabelError",
]


class SiteError(ConcordError):
    """Base class of the site node's domain errors.

    Attributes:
        code: stable machine-readable identifier, e.g. ``"data.missing_column"``.
        hint: optional next step for the operator (:meth:`diagnostics` adds it).
    """

    code = "site.error"


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


class PrivacyConfigurationError(SiteError):
    """The privacy target cannot be met with this training plan (or is malformed)."""

    code = "privacy.invalid_config"


class PrivacyBudgetExhaustedError(SiteError):
    """Running one more round would take the site past its target epsilon."""

    code = "privacy.budget_exhausted"


class AccountantStateError(SiteError):
    """A saved accountant state is malformed or belongs to another study/dataset."""

    code = "privacy.invalid_state"
