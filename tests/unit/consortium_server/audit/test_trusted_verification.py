"""Offline verification from trusted keys only: the attacks of issue 15, items 1 and 2.

The attacker holds the server's head key (a malicious operator, or a stolen key) and the
export file. They rewrite an entry, re-sign every head, replace the sites' keys in the
export with their own and re-make every cosignature; or drop every cosignature; or cut
the log short; or move cosignatures to another log, key or time. Given the real sites'
keys, a quorum and (for truncation) a size or root known from before, ``consortium audit
verify`` must refuse each with exit status 1, and the server must refuse cosignatures that
are not bound to its log and heads.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from concord_protocol.audit.cosignatures import (
    COSIGNATURE_TYPE_V1,
    Cosignature,
    cosignature_message,
)
from concord_protocol.audit.export import AuditExport, write_export
from concord_protocol.audit.heads import encode_public_key
from concord_protocol.audit.merkle import MerkleAccumulator, leaf_hash
from concord_protocol.audit.trusted_keys import write_site_keys
from concord_protocol.audit.verify import ProblemKind, verify_export
from concord_protocol.canonical import canonical_json
from consortium_server.audit.cosignatures import record_cosignature
from consortium_server.audit.export import build_export
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.cli import app as cli_app
from consortium_server.errors import DomainError
from tests.support.audit import make_entry

from .conftest import SiteWitness, build_witnessed_log


class World:
    """A clean log of 12 entries, heads at 8 and 12, each cosigned by both sites."""

    def __init__(
        self, tmp_path: Path, session: Session, signer: TreeHeadSigner, sites: list[SiteWitness]
    ) -> None:
        self.tmp_path, self.signer, self.sites = tmp_path, signer, sites
        self.keys = {s.site_id: s.public_key_b64 for s in sites}
        self.keys_file = tmp_path / "site-keys.json"
        write_site_keys(self.keys_file, self.keys)
        self.export = build_export(
            session, server_public_key=signer.public_key_b64, site_keys=self.keys, witness_quorum=2
        )

    def write(self, export: AuditExport | dict[str, Any], name: str = "export.json") -> Path:
        path = self.tmp_path / name
        if isinstance(export, AuditExport):
            write_export(export, path)
        else:
            path.write_text(json.dumps(export))
        return path

    def cli(self, path: Path, *extra: str, keys: bool = True) -> tuple[int, str]:
        args = ["audit", "verify", "--file", str(path)]
        if keys:
            args += ["--server-key", self.signer.public_key_b64, "--site-keys", str(self.keys_file)]
        result = CliRunner().invoke(cli_app, [*args, *extra])
        return result.exit_code, result.output


@pytest.fixture
def world(
    tmp_path: Path,
    session: Session,
    audit_log: AuditLog,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
) -> World:
    sites = [make_site("site-a"), make_site("site-b")]
    build_witnessed_log(session, audit_log, signer, sites, (8, 12))
    return World(tmp_path, session, signer, sites)


def _rewrite_and_resign(world: World, attacker_sites: dict[str, Ed25519PrivateKey]) -> AuditExport:
    """What a holder of the server key does: change entry 3, re-sign every head, replace the
    sites' keys with its own and re-make every cosignature with them."""
    export = world.export.model_copy(deep=True)
    forged = make_entry(3, action="study.declined").canonical_bytes()
    entries = list(export.entries)
    entries[3] = entries[3].model_copy(
        update={
            "entry_b64": base64.b64encode(forged).decode("ascii"),
            "leaf_hash": leaf_hash(forged).hex(),
        }
    )
    accumulator = MerkleAccumulator()
    roots = {}
    for item in entries:
        accumulator.append(leaf_hash(base64.b64decode(item.entry_b64)))
        roots[accumulator.size] = accumulator.root()
    heads = [world.signer.sign(h.tree_size, roots[h.tree_size], h.timestamp) for h in export.heads]
    cosignatures = []
    for head in heads:
        for site_id, key in attacker_sites.items():
            when = head.timestamp + timedelta(seconds=1)
            message = cosignature_message(
                log_id=export.log_id or "",
                key_id=head.key_id,
                site_id=site_id,
                tree_size=head.tree_size,
                root_hash=head.root_hash,
                head_timestamp=head.timestamp,
                timestamp=when,
            )
            cosignatures.append(
                Cosignature(
                    site_id=site_id,
                    tree_size=head.tree_size,
                    root_hash=head.root_hash,
                    timestamp=when,
                    signature=base64.b64encode(key.sign(message)).decode("ascii"),
                    log_id=export.log_id,
                    key_id=head.key_id,
                    head_timestamp=head.timestamp,
                )
            )
    sites = [
        s.model_copy(
            update={"signing_public_key": encode_public_key(attacker_sites[s.site_id].public_key())}
        )
        for s in export.sites
    ]
    return export.model_copy(
        update={"entries": entries, "heads": heads, "cosignatures": cosignatures, "sites": sites}
    )


def test_the_clean_export_verifies_with_the_trusted_keys_and_quorum(world: World) -> None:
    report = verify_export(
        world.export,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=world.keys,
        quorum=2,
        expected_size=12,
    )
    assert report.ok, report.problems
    assert (report.witnessed_size, report.unwitnessed_entries, report.keys_from_export) == (
        12,
        0,
        False,
    )
    status, output = world.cli(world.write(world.export), "--quorum", "2")
    assert status == 0, output
    assert "witnessed up to 12" in output


def test_a_rewritten_export_with_replaced_site_keys_fails_given_the_real_keys(
    world: World,
) -> None:
    attacker = {s.site_id: Ed25519PrivateKey.generate() for s in world.sites}
    forged = _rewrite_and_resign(world, attacker)
    # Against its own keys the forgery is perfect: that is why the export's keys are not used.
    own_keys = {s.site_id: s.signing_public_key for s in forged.sites}
    self_checked = verify_export(
        forged, trusted_server_key=world.signer.public_key_b64, trusted_site_keys=own_keys, quorum=2
    )
    assert self_checked.ok
    report = verify_export(
        forged,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=world.keys,
        quorum=2,
    )
    assert ProblemKind.COSIGNATURE_INVALID in report.kinds()
    assert ProblemKind.QUORUM_NOT_MET in report.kinds()
    assert report.witnessed_size is None
    assert report.unwitnessed_entries == 12
    status, output = world.cli(world.write(forged), "--quorum", "2")
    assert status == 1, output
    assert "cosignature_invalid" in output
    assert "quorum_not_met" in output


def test_an_export_without_cosignatures_fails_the_quorum(world: World) -> None:
    stripped = world.export.model_copy(update={"cosignatures": []})
    report = verify_export(
        stripped,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=world.keys,
        quorum=2,
    )
    assert report.kinds() == {ProblemKind.QUORUM_NOT_MET}
    assert report.unwitnessed_entries == 12
    status, output = world.cli(world.write(stripped), "--quorum", "2")
    assert status == 1, output
    # Without --quorum nothing was asked of the witnesses, and the command says so.
    status, output = world.cli(world.write(stripped))
    assert status == 0, output
    assert "no --quorum" in output


def test_one_cosignature_short_of_the_quorum_fails(world: World) -> None:
    one_site = world.export.model_copy(
        update={"cosignatures": [c for c in world.export.cosignatures if c.site_id == "site-a"]}
    )
    report = verify_export(
        one_site,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=world.keys,
        quorum=2,
    )
    assert report.kinds() == {ProblemKind.QUORUM_NOT_MET}
    assert verify_export(
        one_site,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=world.keys,
        quorum=1,
    ).ok


def test_a_truncated_export_fails_given_the_size_or_root_known_before(world: World) -> None:
    # Cut back to the head of 8: every remaining signature still verifies.
    cut = world.export.model_copy(
        update={
            "entries": world.export.entries[:8],
            "heads": [h for h in world.export.heads if h.tree_size <= 8],
            "cosignatures": [c for c in world.export.cosignatures if c.tree_size <= 8],
        }
    )
    trusted = {
        "trusted_server_key": world.signer.public_key_b64,
        "trusted_site_keys": world.keys,
        "quorum": 2,
    }
    assert verify_export(cut, **trusted).ok  # type: ignore[arg-type]
    report = verify_export(cut, expected_size=12, **trusted)  # type: ignore[arg-type]
    assert report.kinds() == {ProblemKind.EXPORT_TRUNCATED}
    full_root = next(h.root_hash for h in world.export.heads if h.tree_size == 12)
    report = verify_export(cut, expected_root=full_root, **trusted)  # type: ignore[arg-type]
    assert report.kinds() == {ProblemKind.EXPECTED_ROOT_MISMATCH}
    # The root of 8 known from before still matches a longer, honest log.
    root_8 = next(h.root_hash for h in world.export.heads if h.tree_size == 8)
    assert verify_export(world.export, expected_size=8, expected_root=root_8, **trusted).ok  # type: ignore[arg-type]
    status, output = world.cli(world.write(cut), "--tree-size", "12")
    assert status == 1, output
    assert "export_truncated" in output
    status, output = world.cli(world.write(cut), "--root", full_root)
    assert status == 1, output
    assert "expected_root_mismatch" in output


def _resigned(world: World, cosig: Cosignature, **changes: Any) -> Cosignature:
    """``cosig`` changed and signed again with the real site's key (a site that was made
    to sign something else, or a bug: the binding must catch it)."""
    site = next(s for s in world.sites if s.site_id == cosig.site_id)
    changed = cosig.model_copy(update=changes)
    signature = base64.b64encode(site.key.sign(changed.message())).decode("ascii")
    return changed.model_copy(update={"signature": signature})


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"timestamp": datetime(1970, 1, 1, tzinfo=UTC)}, ProblemKind.COSIGNATURE_TIME_INVALID),
        ({"timestamp": datetime(2999, 1, 1, tzinfo=UTC)}, ProblemKind.COSIGNATURE_TIME_INVALID),
        ({"log_id": "another.consortium/audit"}, ProblemKind.COSIGNATURE_WRONG_LOG),
        ({"key_id": "ab" * 32}, ProblemKind.COSIGNATURE_WRONG_KEY),
        (
            {"head_timestamp": datetime(2020, 1, 1, tzinfo=UTC)},
            ProblemKind.COSIGNATURE_UNKNOWN_HEAD,
        ),
    ],
    ids=["dated-1970", "dated-future", "other-log", "other-server-key", "other-head-time"],
)
def test_a_cosignature_bound_to_something_else_does_not_count(
    world: World, changes: dict[str, Any], kind: ProblemKind
) -> None:
    cosigs = list(world.export.cosignatures)
    latest = max(range(len(cosigs)), key=lambda i: (cosigs[i].tree_size, cosigs[i].site_id))
    cosigs[latest] = _resigned(world, cosigs[latest], **changes)
    edited = world.export.model_copy(update={"cosignatures": cosigs})
    report = verify_export(
        edited,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=world.keys,
        quorum=2,
    )
    assert kind in report.kinds()
    assert ProblemKind.QUORUM_NOT_MET in report.kinds()
    assert ProblemKind.COSIGNATURE_INVALID not in report.kinds()  # the signature itself is good


def test_a_version_1_cosignature_verifies_but_counts_towards_no_quorum(world: World) -> None:
    cosigs = []
    for cosig in world.export.cosignatures:
        site = next(s for s in world.sites if s.site_id == cosig.site_id)
        message = canonical_json(
            {
                "type": COSIGNATURE_TYPE_V1,
                "site_id": cosig.site_id,
                "tree_size": cosig.tree_size,
                "root_hash": cosig.root_hash,
                "timestamp": cosig.model_dump(mode="json")["timestamp"],
            }
        )
        cosigs.append(
            Cosignature(
                version=1,
                site_id=cosig.site_id,
                tree_size=cosig.tree_size,
                root_hash=cosig.root_hash,
                timestamp=cosig.timestamp,
                signature=base64.b64encode(site.key.sign(message)).decode("ascii"),
            )
        )
    legacy = world.export.model_copy(update={"cosignatures": cosigs})
    trusted = {"trusted_server_key": world.signer.public_key_b64, "trusted_site_keys": world.keys}
    report = verify_export(legacy, **trusted)  # type: ignore[arg-type]
    assert report.ok
    assert report.legacy_cosignatures == 4
    report = verify_export(legacy, quorum=1, **trusted)  # type: ignore[arg-type]
    assert report.kinds() == {ProblemKind.QUORUM_NOT_MET}


def test_a_site_that_rotated_its_key_is_checked_with_any_of_its_keys(world: World) -> None:
    keys: dict[str, list[str]] = {
        site_id: [encode_public_key(Ed25519PrivateKey.generate().public_key()), key]
        for site_id, key in world.keys.items()
    }
    report = verify_export(
        world.export,
        trusted_server_key=world.signer.public_key_b64,
        trusted_site_keys=keys,
        quorum=2,
    )
    assert report.ok, report.problems


def test_the_cli_refuses_to_verify_without_trusted_keys(world: World) -> None:
    path = world.write(world.export)
    status, output = world.cli(path, keys=False)
    assert status == 2
    assert "--server-key and --site-keys" in output
    status, output = world.cli(path, "--trust-export-keys", keys=False)
    assert status == 0, output
    assert "whoever rewrote the log could have replaced" in output


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", "{}", '{"site-a": 3}', '{"site-a": []}', '{"site-a": "bm90IGEga2V5"}'],
    ids=["not-json", "a-list", "empty", "not-a-key", "no-keys", "not-ed25519"],
)
def test_a_malformed_site_keys_file_is_a_usage_error(world: World, content: str) -> None:
    world.keys_file.write_text(content)
    status, output = world.cli(world.write(world.export))
    assert status == 2
    assert "site-keys" in output or str(world.keys_file) in output


def test_record_cosignature_refuses_version_1(
    session: Session,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
    append_entries: Callable[[int], list[int]],
) -> None:
    site = make_site("site-a")
    append_entries(1)
    head = signer.sign_latest(session)
    v1 = Cosignature(
        version=1,
        site_id="site-a",
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        timestamp=head.timestamp,
        signature="AA==",
    )
    with pytest.raises(DomainError) as info:
        record_cosignature(session, v1, site_public_key=site.public_key_b64)
    assert info.value.code == "audit.cosignature_invalid"


def test_one_key_under_two_site_ids_is_one_witness(world: World) -> None:
    site_a = world.sites[0]
    cosigs = [c for c in world.export.cosignatures if c.site_id == site_a.site_id]
    twin = []  # site-a's key signing again under another site id
    for cosig in cosigs:
        renamed = cosig.model_copy(update={"site_id": "site-twin"})
        signature = base64.b64encode(site_a.key.sign(renamed.message())).decode("ascii")
        twin.append(renamed.model_copy(update={"signature": signature}))
    doubled = world.export.model_copy(update={"cosignatures": cosigs + twin})
    keys = {site_a.site_id: site_a.public_key_b64, "site-twin": site_a.public_key_b64}
    report = verify_export(
        doubled, trusted_server_key=world.signer.public_key_b64, trusted_site_keys=keys, quorum=2
    )
    assert report.kinds() == {ProblemKind.QUORUM_NOT_MET}


def test_an_emptied_export_fails_a_quorum_and_misuse_is_refused(world: World) -> None:
    empty = world.export.model_copy(update={"entries": [], "heads": [], "cosignatures": []})
    trusted = {"trusted_server_key": world.signer.public_key_b64, "trusted_site_keys": world.keys}
    report = verify_export(empty, quorum=1, **trusted)  # type: ignore[arg-type]
    assert report.kinds() == {ProblemKind.QUORUM_NOT_MET}
    with pytest.raises(ValueError, match="at least 1"):
        verify_export(world.export, quorum=0, **trusted)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="site keys"):
        verify_export(world.export, trusted_server_key=world.signer.public_key_b64, quorum=2)
    with pytest.raises(ValueError, match="negative"):
        verify_export(world.export, expected_size=-1, **trusted)  # type: ignore[arg-type]
