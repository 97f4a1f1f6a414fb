"""The site's contract guard, approvals store and app-bundle check."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from concord_protocol.bundle import APP_DIR, bundle_hash
from site_node.federation.approvals import ApprovalError, ApprovalStore
from site_node.federation.mods import GuardRefusalError, check_contract
from site_node.federation.processes import BundleRefusedError, check_bundle, write_runner_shim
from tests.support.flower import breast_cancer_contract


def _run_config(contract_json: str, contract_hash: str, study_id: str = "s1") -> dict[str, object]:
    return {"study-id": study_id, "contract-hash": contract_hash, "contract": contract_json}


def test_guard_accepts_only_the_approved_contract(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    contract = breast_cancer_contract()
    other = breast_cancer_contract(title="Another study entirely")
    chash = contract.contract_hash()
    with pytest.raises(GuardRefusalError, match="not_approved"):
        check_contract(store, _run_config(contract.canonical().decode(), chash))
    store.approve("s1", contract, chash)

    assert check_contract(store, _run_config(contract.canonical().decode(), chash)) == contract
    # Approved hash, but the run carries another contract under it.
    with pytest.raises(GuardRefusalError, match="hash_mismatch"):
        check_contract(store, _run_config(other.canonical().decode(), chash))
    with pytest.raises(GuardRefusalError, match="wrong_study"):
        check_contract(store, _run_config(contract.canonical().decode(), chash, study_id="s2"))
    with pytest.raises(GuardRefusalError, match="not_approved"):
        check_contract(store, _run_config(other.canonical().decode(), other.contract_hash()))
    store.revoke(chash)
    with pytest.raises(GuardRefusalError, match="not_approved"):
        check_contract(store, _run_config(contract.canonical().decode(), chash))


def test_store_refuses_mismatched_approval_and_leaky_key_files(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    contract = breast_cancer_contract()
    with pytest.raises(ApprovalError, match="does not hash"):
        store.approve("s1", contract, "0" * 64)
    store.save_study_key("s1", b"secret-bytes", sender_id="hospital-a")
    key = store.study_key("s1")
    assert key is not None
    assert key.secret_context == b"secret-bytes"
    (tmp_path / "federation" / "study-keys" / "s1.ctx").chmod(0o644)
    with pytest.raises(ApprovalError, match="readable"):
        store.study_key("s1")
    with pytest.raises(ApprovalError):
        store.save_study_key("../evil", b"x", sender_id="a")


def test_own_bundle_is_accepted_and_anything_else_refused(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path / "state")
    own = build_fab_from_disk(APP_DIR)
    assert check_bundle(own, store) == bundle_hash() == hashlib.sha256(own).hexdigest()

    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text((APP_DIR / "pyproject.toml").read_text())
    (app / "extra.py").write_text("x = 1\n")
    with_code = build_fab_from_disk(app)
    with pytest.raises(BundleRefusedError, match="not allowed"):
        check_bundle(with_code, store)
    # Even when a steward allows its hash, a bundle with code is refused.
    store.allow_fab(hashlib.sha256(with_code).hexdigest())
    with pytest.raises(BundleRefusedError, match="other than its configuration"):
        check_bundle(with_code, store)


def test_allowed_bundle_must_name_the_site_clientapp(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(
            "pyproject.toml",
            (APP_DIR / "pyproject.toml")
            .read_text()
            .replace("site_node.federation.clientapp:app", "somewhere.else:app"),
        )
    fab = buf.getvalue()
    store.allow_fab(hashlib.sha256(fab).hexdigest())
    with pytest.raises(BundleRefusedError, match="another ClientApp"):
        check_bundle(fab, store)


def test_flower_names_the_runner_replaces_still_exist(tmp_path: Path) -> None:
    from flwr.supernode.runtime import run_clientapp as runner

    assert callable(runner.install_from_fab)
    assert callable(runner.get_load_client_app_fn)
    assert callable(runner.run_clientapp)
    shim = write_runner_shim(tmp_path / "bin", tmp_path / "state")
    assert shim.name == "flwr-clientapp"
    assert shim.stat().st_mode & 0o111
    assert "guarded_clientapp_main" in shim.read_text()
