"""Export and offline verification: a clean log reports OK; problems are all listed."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy.orm import Session

from concord_protocol.audit.export import load_export, write_export
from concord_protocol.audit.render import render_report
from concord_protocol.audit.verify import ProblemKind, verify_export
from consortium_server.audit.cli_support import load_export_file
from consortium_server.audit.cosignatures import record_cosignature
from consortium_server.audit.export import build_export
from consortium_server.audit.log import AuditLog
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.errors import DomainError

from .conftest import SiteWitness


@pytest.fixture
def exported(
    tmp_path: Path,
    audit_log: AuditLog,
    session: Session,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
    append_entries: Callable[[int], list[int]],
) -> tuple[Path, dict[str, str]]:
    sites = [make_site("site-a"), make_site("site-b")]
    append_entries(5)
    head = signer.sign_latest(session)
    for site in sites:
        record_cosignature(
            session, site.witness().cosign(head, []), site_public_key=site.public_key_b64
        )
    append_entries(2)  # not yet signed
    session.commit()
    keys = {s.site_id: s.public_key_b64 for s in sites}
    export = build_export(
        session, server_public_key=signer.public_key_b64, site_keys=keys, witness_quorum=2
    )
    path = tmp_path / "audit-export.json"
    write_export(export, path)
    return path, keys


def test_clean_export_verifies_ok(
    exported: tuple[Path, dict[str, str]], signer: TreeHeadSigner
) -> None:
    path, keys = exported
    report = verify_export(
        load_export_file(path), trusted_server_key=signer.public_key_b64, trusted_site_keys=keys
    )
    assert report.ok, report.problems
    assert (report.entries, report.heads, report.cosignatures) == (7, 1, 2)
    assert (report.witnessed_size, report.unsigned_entries) == (5, 2)
    console = Console(file=io.StringIO(), width=200)
    render_report(report, console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "OK: 7 entries, 1 signed heads, 2 cosignatures verified, witnessed up to 5" in output


def test_every_problem_in_an_edited_export_is_listed(
    exported: tuple[Path, dict[str, str]], signer: TreeHeadSigner
) -> None:
    path, keys = exported
    data = json.loads(path.read_text())
    data["entries"][1]["leaf_hash"] = "00" * 32
    data["entries"][4]["entry_b64"] = data["entries"][0]["entry_b64"]
    data["cosignatures"][0]["signature"] = data["cosignatures"][1]["signature"]
    del data["entries"][6]
    path.write_text(json.dumps(data))
    report = verify_export(
        load_export_file(path), trusted_server_key=signer.public_key_b64, trusted_site_keys=keys
    )
    found = {(p.kind, p.index, p.tree_size, p.site_id) for p in report.problems}
    assert (ProblemKind.LEAF_HASH_MISMATCH, 1, None, None) in found
    assert (ProblemKind.LEAF_HASH_MISMATCH, 4, None, None) in found
    assert (ProblemKind.HEAD_ROOT_MISMATCH, None, 5, None) in found
    assert (ProblemKind.COSIGNATURE_INVALID, None, 5, "site-a") in found
    console = Console(file=io.StringIO(), width=200)
    render_report(report, console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "leaf_hash_mismatch" in output
    assert "FAILED" in output


def test_an_export_signed_by_another_key_is_untrusted(
    exported: tuple[Path, dict[str, str]],
) -> None:
    path, _ = exported
    report = verify_export(
        load_export(path), trusted_server_key=TreeHeadSigner.generate().public_key_b64
    )
    assert {ProblemKind.SERVER_KEY_UNTRUSTED, ProblemKind.HEAD_SIGNATURE_INVALID} <= report.kinds()


def test_unreadable_export_is_a_domain_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(DomainError) as info:
            load_export_file(path)
        assert info.value.code == "audit.export_invalid"
