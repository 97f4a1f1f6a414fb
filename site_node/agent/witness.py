"""Audit-log witness: cosign the consortium's latest tree head if it extends the last one.

One pass (:func:`cosign_latest`):

1. ``GET /api/v1/audit/heads/latest``; if this site already cosigned exactly that head
   (its state file holds it and the server lists the cosignature) nothing more happens;
2. ``GET /api/v1/audit/consistency?first=<last cosigned size>&second=<new size>``;
3. :meth:`consortium_server.audit.witness.Witness.cosign` checks the server's signature,
   that the tree did not shrink and the consistency proof, then stores the new head in
   ``<state_dir>/witness/state.json`` (atomic, fsync) and signs it with the site's Ed25519
   key;
4. ``POST /api/v1/audit/heads/{size}/cosignatures`` (idempotent on the server, so a post
   lost in transit is simply repeated on the next pass).

A refusal (``audit.tree_inconsistent``, ``audit.tree_shrunk``, a bad signature) fails the
pass loudly: it means the log was rewritten or the server key changed. Do not delete the
state file to "fix" it: that would let the site cosign a rewritten log.

The server's head key: ``CONCORD_SITE_SERVER_HEAD_KEY`` (base64 raw Ed25519, from the
consortium operator) when set. When it is not set the agent **trusts on first use** the
key that ``/heads/latest`` names and pins it in ``<state_dir>/witness/server-head-key``;
later passes refuse any other key. The risk: a server that is already malicious on the
very first pass (or an attacker between the site and the server then) could have the site
pin its key; everything the site cosigns afterwards is still checked for consistency, but
against that key. Configure the key explicitly in production. The log's identity, which
every cosignature binds (:mod:`concord_protocol.audit.cosignatures`), is pinned the same
way (``CONCORD_SITE_AUDIT_LOG_ID``, else ``<state_dir>/witness/log-id`` on first use).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from concord_protocol.audit.heads import SignedTreeHead, decode_public_key
from concord_protocol.client import ConsortiumClient
from site_node.agent.cosigner import Witness
from site_node.agent.sync import AgentError

__all__ = [
    "PINNED_KEY_FILE",
    "PINNED_LOG_FILE",
    "STATE_FILE",
    "WitnessResult",
    "cosign_latest",
    "verify_latest",
    "witnessed_head",
]

STATE_FILE = Path("witness") / "state.json"
PINNED_KEY_FILE = Path("witness") / "server-head-key"
PINNED_LOG_FILE = Path("witness") / "log-id"
_LOG_ID = re.compile(r"[!-~]{1,128}")


@dataclass(frozen=True)
class WitnessResult:
    """What one witness pass did."""

    tree_size: int
    cosigned: bool
    trusted_on_first_use: bool = False

    def summary(self) -> dict[str, int | bool]:
        """Fields for the log."""
        return {
            "tree_size": self.tree_size,
            "cosigned": self.cosigned,
            "trusted_on_first_use": self.trusted_on_first_use,
        }


def _pinned(
    pinned_path: Path, configured: str | None, offered: str, check: Callable[[str], object]
) -> tuple[str, bool]:
    """The value to trust (configured, else pinned, else ``offered`` pinned now) and whether
    it was pinned just now (trust on first use). ``check`` refuses garbage before pinning."""
    if configured:
        return configured.strip(), False
    if pinned_path.is_file():
        return pinned_path.read_text().strip(), False
    check(offered)
    pinned_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = pinned_path.with_name(f".{pinned_path.name}.{os.getpid()}.tmp")
    tmp.write_text(offered + "\n")
    os.replace(tmp, pinned_path)
    return offered, True


def _check_log_id(value: str) -> None:
    if not _LOG_ID.fullmatch(value):
        raise AgentError(
            f"the server names the audit log {value!r}, not a log identity",
            code="agent.log_id_invalid",
        )


@dataclass(frozen=True)
class _Prepared:
    witness: Witness
    head: SignedTreeHead
    proof: list[bytes]
    already_cosigned: bool
    first_use: bool


def _prepare(
    api: ConsortiumClient,
    *,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    state_dir: Path,
    server_head_key: str | None,
    audit_log_id: str | None,
    pin: bool,
) -> _Prepared:
    """Fetch the latest head and the consistency proof from the last cosigned head."""
    latest: dict[str, Any] = api.request("GET", "/api/v1/audit/heads/latest")
    offered = str(latest.get("server_public_key", ""))
    offered_log = str(latest.get("log_id", ""))
    state = Path(state_dir)
    if pin or server_head_key or (state / PINNED_KEY_FILE).is_file():
        key_b64, first_use = _pinned(
            state / PINNED_KEY_FILE, server_head_key, offered, decode_public_key
        )
        log_path = state / PINNED_LOG_FILE
        if pin or audit_log_id or log_path.is_file():
            log_id, _ = _pinned(log_path, audit_log_id, offered_log, _check_log_id)
        else:  # read-only, and a site from before log ids: check against what is offered
            log_id = offered_log
    else:
        raise AgentError(
            "no trusted tree-head key yet",
            code="agent.no_server_key",
            hint="Set CONCORD_SITE_SERVER_HEAD_KEY, or let `site-node run` pin it first.",
        )
    if offered != key_b64:
        raise AgentError(
            "the consortium signs tree heads with another key than the one this site trusts",
            code="agent.server_key_changed",
            hint="Ask the consortium operator whether the head key was rotated; do not "
            "delete the witness state.",
        )
    if offered_log != log_id:
        raise AgentError(
            f"the consortium names its audit log {offered_log!r}; this site cosigns {log_id!r}",
            code="agent.log_id_changed",
            hint="Ask the consortium operator; set CONCORD_SITE_AUDIT_LOG_ID to the log's "
            "identity, and do not delete the witness state.",
        )
    head = SignedTreeHead.model_validate(
        {k: latest[k] for k in ("tree_size", "root_hash", "timestamp", "key_id", "signature")}
    )
    witness = Witness(
        state / STATE_FILE, site_id, signing_key, decode_public_key(key_b64), log_id=log_id
    )
    last = witness.last_head
    listed = any(c.get("site_id") == site_id for c in latest.get("cosignatures", []))
    same = last is not None and (last.tree_size, last.root_hash) == (
        head.tree_size,
        head.root_hash,
    )
    proof: list[bytes] = []
    if last is not None and 0 < last.tree_size < head.tree_size:
        body: dict[str, Any] = api.request(
            "GET",
            "/api/v1/audit/consistency",
            params={"first": last.tree_size, "second": head.tree_size},
        )
        proof = [bytes.fromhex(p) for p in body["proof"]]
    return _Prepared(witness, head, proof, same and listed, first_use)


def witnessed_head(state_dir: Path) -> SignedTreeHead | None:
    """The last tree head this site cosigned (its own witness state; ``None`` before the
    first). It was checked when cosigned: signed by the trusted key, consistent with the
    one before."""
    path = Path(state_dir) / STATE_FILE
    try:
        head: dict[str, Any] = json.loads(path.read_text())["head"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise AgentError(f"{path} is damaged", code="audit.witness_state_invalid") from None
    return SignedTreeHead.model_validate(head)


def cosign_latest(
    api: ConsortiumClient,
    *,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    state_dir: Path,
    server_head_key: str | None = None,
    audit_log_id: str | None = None,
) -> WitnessResult:
    """One witness pass (see the module docstring).

    Raises :class:`~consortium_server.audit.witness.WitnessRefusedError` when the head must
    not be cosigned, :class:`AgentError` (``agent.server_key_changed``) when the server signs
    with another key than the trusted one, and API errors for the caller to retry.
    """
    prepared = _prepare(
        api,
        site_id=site_id,
        signing_key=signing_key,
        state_dir=state_dir,
        server_head_key=server_head_key,
        audit_log_id=audit_log_id,
        pin=True,
    )
    head = prepared.head
    if prepared.already_cosigned:
        return WitnessResult(head.tree_size, cosigned=False, trusted_on_first_use=False)
    cosignature = prepared.witness.cosign(head, prepared.proof)
    api.request(
        "POST",
        f"/api/v1/audit/heads/{head.tree_size}/cosignatures",
        json={
            "site_id": site_id,
            "root_hash": cosignature.root_hash,
            "timestamp": cosignature.model_dump(mode="json")["timestamp"],
            "signature": cosignature.signature,
            "log_id": cosignature.log_id,
            "key_id": cosignature.key_id,
            "head_timestamp": cosignature.model_dump(mode="json")["head_timestamp"],
        },
    )
    return WitnessResult(head.tree_size, cosigned=True, trusted_on_first_use=prepared.first_use)


def verify_latest(
    api: ConsortiumClient,
    *,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    state_dir: Path,
    server_head_key: str | None = None,
    audit_log_id: str | None = None,
) -> tuple[int, int | None]:
    """Check, without cosigning or storing anything, that the latest head is signed by the
    trusted key and extends the last head this site cosigned.

    Returns ``(latest size, last cosigned size or None)``; raises like :func:`cosign_latest`
    (and ``agent.no_server_key`` when no key is configured or pinned yet).
    """
    prepared = _prepare(
        api,
        site_id=site_id,
        signing_key=signing_key,
        state_dir=state_dir,
        server_head_key=server_head_key,
        audit_log_id=audit_log_id,
        pin=False,
    )
    last = prepared.witness.last_head
    prepared.witness.check(prepared.head, prepared.proof)
    return prepared.head.tree_size, None if last is None else last.tree_size
