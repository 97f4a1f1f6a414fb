"""The site's local store of approved study contracts and study keys.

A data steward's approval is recorded here, on disk under the site's state dir, by the
site agent (or ``site-node`` commands); the Flower ClientApp only *reads* it. Layout::

    <state_dir>/federation/
        approvals/<contract_hash>.json    {"study_id", "contract_hash", "contract", "approved_at"}
        decisions/<study_id>.json         the site's signed decision and whether it was posted
        study-keys/<study_id>.ctx         the study's CKKS secret context (mode 0600)
        study-keys/<study_id>.json        {"key_fingerprint", "sender_id", "public_context_sha256"}
        allowed-fabs.txt                  extra Flower app bundles the site accepts (below)
        dp/<study_id>-<hash[:16]>.json    the Opacus accountant state of the study

The contract is stored as the site saw it when approving, and :meth:`ApprovalStore.approve`
refuses a contract whose hash is not the one given: a run can only use a contract the
steward actually approved. Nothing here logs contents.

``allowed-fabs.txt`` is the site operator's list of app bundles (FABs) the site runs besides
its own, one a line: ``<fab hash>`` (the bundle may name only Concord's ClientApp,
:data:`~concord_protocol.bundle.CLIENTAPP_REF`; every line of earlier versions reads so) or
``<fab hash> <module:attr>`` (a bundle of that hash may name only that ClientApp, which the
site's guarded runner then imports, see :mod:`site_node.federation.processes`). Each hash
allows exactly one ClientApp. A line that does not parse, and a hash listed with two
different ClientApps (a hand-edited file), allow nothing: deny by default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from concord_protocol.bundle import CLIENTAPP_REF
from concord_protocol.contract import StudyContract
from concord_protocol.private_files import write_private_file
from concord_protocol.site_decisions import SignedDecision
from concord_protocol.wire.format import sha256_hex
from site_node.crypto.sealing import study_key_fingerprint
from site_node.errors import SiteError

__all__ = ["ApprovalError", "ApprovalStore", "ApprovedStudy", "StudyKey", "is_clientapp_ref"]

_HEX64 = frozenset("0123456789abcdef")
_ALLOWED_FABS = "allowed-fabs.txt"
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_CLIENTAPP_REF = re.compile(rf"{_DOTTED}:{_DOTTED}")


class ApprovalError(SiteError):
    """A contract or key cannot be stored or is missing. ``code`` is stable (``approval.*``)."""

    code = "approval.invalid"


@dataclass(frozen=True)
class ApprovedStudy:
    """A contract this site approved."""

    study_id: str
    contract_hash: str
    contract: StudyContract
    approved_at: str


@dataclass(frozen=True)
class StudyKey:
    """The study's CKKS secret context as held by this site."""

    study_id: str
    secret_context: bytes
    key_fingerprint: str
    sender_id: str


def _is_hash(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX64


def is_clientapp_ref(value: str) -> bool:
    """Whether ``value`` is a ClientApp reference, ``module.path:attribute`` (dotted
    identifiers only: nothing that could name a file or carry arguments)."""
    return len(value) <= 200 and _CLIENTAPP_REF.fullmatch(value) is not None


def _safe_id(value: str) -> str:
    if not value or len(value) > 128 or not all(c.isalnum() or c in "._-" for c in value):
        raise ApprovalError("study id must be 1-128 of [A-Za-z0-9._-]", code="approval.bad_id")
    if value.startswith("."):
        raise ApprovalError("study id must not start with '.'", code="approval.bad_id")
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically by a file of mode 0600 from its creation on."""
    write_private_file(path, data)


class ApprovalStore:
    """Approved contract hashes, study keys and accepted app bundles of one site."""

    def __init__(self, state_dir: Path | str) -> None:
        self.root = Path(state_dir) / "federation"

    # --- approvals --------------------------------------------------------------------

    def _approval_path(self, contract_hash: str) -> Path:
        if not _is_hash(contract_hash):
            raise ApprovalError("not a contract hash", code="approval.bad_hash")
        return self.root / "approvals" / f"{contract_hash}.json"

    def approve(self, study_id: str, contract: StudyContract, contract_hash: str) -> ApprovedStudy:
        """Record the steward's approval of ``contract`` (which must hash to ``contract_hash``)."""
        if contract.contract_hash() != contract_hash:
            raise ApprovalError(
                "the contract does not hash to the approved value", code="approval.hash_mismatch"
            )
        record = ApprovedStudy(
            study_id=_safe_id(study_id),
            contract_hash=contract_hash,
            contract=contract,
            approved_at=datetime.now(UTC).isoformat(),
        )
        body = {
            "study_id": record.study_id,
            "contract_hash": contract_hash,
            "contract": contract.model_dump(mode="json"),
            "approved_at": record.approved_at,
        }
        _write_atomic(self._approval_path(contract_hash), json.dumps(body, sort_keys=True).encode())
        return record

    def revoke(self, contract_hash: str) -> None:
        """Withdraw an approval (later runs of that contract are refused)."""
        self._approval_path(contract_hash).unlink(missing_ok=True)

    def get(self, contract_hash: str) -> ApprovedStudy | None:
        """The approval of ``contract_hash``, or ``None``; re-checks the stored contract's hash."""
        try:
            path = self._approval_path(contract_hash)
        except ApprovalError:
            return None
        if not path.is_file():
            return None
        body = json.loads(path.read_text())
        contract = StudyContract.model_validate(body["contract"])
        if contract.contract_hash() != contract_hash or body.get("contract_hash") != contract_hash:
            raise ApprovalError(
                "stored approval does not match its hash (file altered?)",
                code="approval.corrupt",
            )
        return ApprovedStudy(
            study_id=str(body["study_id"]),
            contract_hash=contract_hash,
            contract=contract,
            approved_at=str(body["approved_at"]),
        )

    def approved_hashes(self) -> set[str]:
        """Every approved contract hash."""
        folder = self.root / "approvals"
        if not folder.is_dir():
            return set()
        return {p.stem for p in folder.glob("*.json") if _is_hash(p.stem)}

    # --- signed decisions -------------------------------------------------------------

    def _decision_path(self, study_id: str) -> Path:
        return self.root / "decisions" / f"{_safe_id(study_id)}.json"

    def record_decision(self, signed: SignedDecision, *, posted: bool = False) -> None:
        """Keep the site's signed decision on a study (and whether the server has it)."""
        body = {"signed": signed.model_dump(mode="json"), "posted": posted}
        _write_atomic(
            self._decision_path(signed.decision.study_id),
            json.dumps(body, sort_keys=True).encode(),
        )

    def decision(self, study_id: str) -> tuple[SignedDecision, bool] | None:
        """The site's signed decision on ``study_id`` and whether it was posted, or ``None``."""
        path = self._decision_path(study_id)
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text())
            return SignedDecision.model_validate(body["signed"]), bool(body["posted"])
        except (ValueError, KeyError, ValidationError):
            raise ApprovalError(
                f"{path} is damaged (file altered?)", code="approval.corrupt"
            ) from None

    def mark_posted(self, study_id: str) -> None:
        """Note that the server recorded the site's decision on ``study_id``."""
        current = self.decision(study_id)
        if current is not None and not current[1]:
            self.record_decision(current[0], posted=True)

    def approvals_of(self, study_id: str) -> list[ApprovedStudy]:
        """Every contract of ``study_id`` this site approved (normally one)."""
        found = []
        for contract_hash in sorted(self.approved_hashes()):
            record = self.get(contract_hash)
            if record is not None and record.study_id == study_id:
                found.append(record)
        return found

    # --- study keys -------------------------------------------------------------------

    def save_study_key(self, study_id: str, secret_context: bytes, *, sender_id: str) -> StudyKey:
        """Store the study's secret context (from :func:`open_study_key` or generated here)."""
        sid = _safe_id(study_id)
        fingerprint = study_key_fingerprint(secret_context)
        folder = self.root / "study-keys"
        _write_atomic(folder / f"{sid}.ctx", secret_context)
        meta = {"key_fingerprint": fingerprint, "sender_id": sender_id}
        _write_atomic(folder / f"{sid}.json", json.dumps(meta, sort_keys=True).encode())
        return StudyKey(sid, secret_context, fingerprint, sender_id)

    def study_key(self, study_id: str) -> StudyKey | None:
        """The study's key, or ``None`` when this site has none yet."""
        sid = _safe_id(study_id)
        folder = self.root / "study-keys"
        ctx_path, meta_path = folder / f"{sid}.ctx", folder / f"{sid}.json"
        if not ctx_path.is_file() or not meta_path.is_file():
            return None
        if ctx_path.stat().st_mode & 0o077:
            raise ApprovalError(
                f"{ctx_path} is readable by group or others", code="approval.key_permissions"
            )
        secret = ctx_path.read_bytes()
        meta = json.loads(meta_path.read_text())
        if study_key_fingerprint(secret) != meta.get("key_fingerprint"):
            raise ApprovalError("study key does not match its fingerprint", code="approval.corrupt")
        return StudyKey(sid, secret, str(meta["key_fingerprint"]), str(meta["sender_id"]))

    def delete_study_key(self, study_id: str) -> bool:
        """Drop the study's secret context and its metadata (the study was aborted, failed or
        rejected, or this site was revoked from it); True if there was a key to drop.

        The accountant state stays: it records what this site spent, which never shrinks.
        """
        sid = _safe_id(study_id)
        folder = self.root / "study-keys"
        dropped = False
        for path in (folder / f"{sid}.ctx", folder / f"{sid}.json"):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            dropped = True
        return dropped

    # --- app bundles and accountant state ---------------------------------------------

    def allowed_fabs(self) -> dict[str, str]:
        """The extra app bundle (FAB) hashes the site accepts besides its own bundle, each
        with the one ClientApp reference (``module:attr``) a bundle of that hash may name.

        Old-format lines (a hash alone) map to Concord's ClientApp. Malformed lines, and
        hashes listed with two different ClientApps, are left out (see the module).
        """
        path = self.root / _ALLOWED_FABS
        if not path.is_file():
            return {}
        allowed: dict[str, str] = {}
        conflicting: set[str] = set()
        for line in path.read_text().splitlines():
            parts = line.split()
            if not parts or len(parts) > 2 or not _is_hash(parts[0]):
                continue
            fab_hash, ref = parts[0], (parts[1] if len(parts) == 2 else CLIENTAPP_REF)
            if not is_clientapp_ref(ref):
                continue
            if allowed.setdefault(fab_hash, ref) != ref:
                conflicting.add(fab_hash)
        return {h: ref for h, ref in allowed.items() if h not in conflicting}

    def allowed_fab_hashes(self) -> set[str]:
        """The extra app bundle hashes the site accepts (whatever ClientApp each allows)."""
        return set(self.allowed_fabs())

    def allowed_clientapp(self, fab_hash: str) -> str | None:
        """The ClientApp a bundle of ``fab_hash`` may name, or ``None`` if not allowed."""
        return self.allowed_fabs().get(fab_hash)

    def allow_fab(self, fab_hash: str, *, clientapp: str = CLIENTAPP_REF) -> None:
        """Accept one more app bundle hash, naming ``clientapp`` (``module:attr``).

        The default, Concord's own ClientApp, is for e.g. a newer release of the site's
        bundle. Another ClientApp (``benchmarks.apps.compare_client:app`` for the
        aggregation comparison) is code the site's guarded runner will import for runs of
        this exact bundle: allow only code installed at the site that the operator trusts.
        Allowing a hash again replaces the ClientApp it allows.
        """
        if not _is_hash(fab_hash):
            raise ApprovalError("not a FAB hash", code="approval.bad_hash")
        if not is_clientapp_ref(clientapp):
            raise ApprovalError(
                "not a ClientApp reference (module.path:attribute)", code="approval.bad_clientapp"
            )
        allowed = {**self.allowed_fabs(), fab_hash: clientapp}
        lines = [
            h if ref == CLIENTAPP_REF else f"{h} {ref}"  # bare hash: readable by old versions
            for h, ref in sorted(allowed.items())
        ]
        _write_atomic(self.root / _ALLOWED_FABS, ("\n".join(lines) + "\n").encode())

    def dp_state_path(self, study_id: str, contract_hash: str) -> Path:
        """Where the study's accountant state lives at this site."""
        return self.root / "dp" / f"{_safe_id(study_id)}-{contract_hash[:16]}.json"


def contract_digest(contract_json: str) -> str:
    """Hash of a contract given as JSON text (the value sites approve)."""
    return StudyContract.model_validate_json(contract_json).contract_hash()


def public_context_digest(public_context: bytes) -> str:
    """SHA-256 hex of a public context."""
    return sha256_hex(public_context)
