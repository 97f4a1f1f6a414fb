"""The site's contract guard, approvals store and app-bundle check.

The bundle check is the site's code-execution boundary: a bundle runs only if its hash is
the site's own or one the operator allowed, and then only with the ClientApp allowed for
that hash (Concord's, unless the operator named another with the hash).
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk

from concord_protocol.bundle import APP_DIR, CLIENTAPP_REF, bundle_hash
from site_node.federation.approvals import ApprovalError, ApprovalStore
from site_node.federation.mods import GuardRefusalError, check_contract
from site_node.federation.processes import (
    AcceptedBundle,
    BundleRefusedError,
    check_bundle,
    guarded_clientapp_main,
    load_clientapp,
    write_runner_shim,
)
from tests.support.flower import breast_cancer_contract

#: A ClientApp installed in the development venv (the benchmarks' comparison ClientApp).
OTHER_CLIENTAPP = "benchmarks.apps.compare_client:app"
#: A module that exists nowhere: a refused bundle naming it must not even try to import it.
UNKNOWN_MODULE = "concord_test_never_imported"


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


def _fab(clientapp: str = CLIENTAPP_REF, *, tag: str = "") -> bytes:
    """A configuration-only FAB: Concord's pyproject naming ``clientapp`` (``tag`` makes
    its hash differ)."""
    text = (APP_DIR / "pyproject.toml").read_text().replace(CLIENTAPP_REF, clientapp)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("pyproject.toml", text + (f"# {tag}\n" if tag else ""))
    return buf.getvalue()


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_own_bundle_is_accepted_and_anything_else_refused(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path / "state")
    own = build_fab_from_disk(APP_DIR)
    assert check_bundle(own, store) == AcceptedBundle(bundle_hash(), CLIENTAPP_REF)
    assert bundle_hash() == hashlib.sha256(own).hexdigest()

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
    fab = _fab("somewhere.else:app")
    store.allow_fab(hashlib.sha256(fab).hexdigest())
    with pytest.raises(BundleRefusedError, match="another ClientApp"):
        check_bundle(fab, store)


def test_a_hash_allowed_with_another_clientapp_loads_exactly_that_one(tmp_path: Path) -> None:
    from benchmarks.apps import compare_client

    store = ApprovalStore(tmp_path)
    fab = _fab(OTHER_CLIENTAPP)
    store.allow_fab(_sha(fab), clientapp=OTHER_CLIENTAPP)
    assert store.allowed_fabs() == {_sha(fab): OTHER_CLIENTAPP}

    accepted = check_bundle(fab, store)

    assert accepted == AcceptedBundle(_sha(fab), OTHER_CLIENTAPP)
    assert load_clientapp(accepted.clientapp) is compare_client.app
    # The site's own bundle still means Concord's ClientApp, whatever else is allowed.
    assert check_bundle(build_fab_from_disk(APP_DIR), store).clientapp == CLIENTAPP_REF


@pytest.mark.parametrize(
    ("allowed_with", "named"),
    [
        (OTHER_CLIENTAPP, CLIENTAPP_REF),  # allowed for another ClientApp than it names
        (None, OTHER_CLIENTAPP),  # allowed for Concord's ClientApp only
        (OTHER_CLIENTAPP, f"{UNKNOWN_MODULE}:app"),  # code the site never allowed
    ],
)
def test_a_bundle_naming_a_clientapp_not_allowed_for_its_hash_is_refused(
    tmp_path: Path, allowed_with: str | None, named: str
) -> None:
    store = ApprovalStore(tmp_path)
    fab = _fab(named)
    if allowed_with is None:
        store.allow_fab(_sha(fab))
    else:
        store.allow_fab(_sha(fab), clientapp=allowed_with)
    with pytest.raises(BundleRefusedError, match="another ClientApp than the site allowed"):
        check_bundle(fab, store)
    # Allowing the ClientApp for one bundle allows no other bundle to name it.
    store.allow_fab(_sha(fab), clientapp=named)
    other = _fab(named, tag="another bundle")
    with pytest.raises(BundleRefusedError, match="not allowed"):
        check_bundle(other, store)
    assert UNKNOWN_MODULE not in sys.modules


def test_old_allow_list_entries_mean_concords_clientapp_only(tmp_path: Path) -> None:
    """``allowed-fabs.txt`` of earlier versions: one bare hash a line."""
    store = ApprovalStore(tmp_path)
    concords, others = _fab(CLIENTAPP_REF, tag="release 2"), _fab(OTHER_CLIENTAPP)
    path = tmp_path / "federation" / "allowed-fabs.txt"
    path.parent.mkdir(parents=True)
    path.write_text(f"{_sha(concords)}\n{_sha(others)}\nnot-a-hash\n")

    assert store.allowed_fabs() == {_sha(concords): CLIENTAPP_REF, _sha(others): CLIENTAPP_REF}
    assert store.allowed_fab_hashes() == {_sha(concords), _sha(others)}
    assert check_bundle(concords, store) == AcceptedBundle(_sha(concords), CLIENTAPP_REF)
    with pytest.raises(BundleRefusedError, match="another ClientApp"):
        check_bundle(others, store)

    # A new entry keeps the old ones as they were (bare hashes: old versions read them).
    store.allow_fab("f" * 64, clientapp=OTHER_CLIENTAPP)
    assert path.read_text().splitlines() == sorted(
        [_sha(concords), _sha(others), f"{'f' * 64} {OTHER_CLIENTAPP}"]
    )
    assert store.allowed_clientapp(_sha(others)) == CLIENTAPP_REF
    assert store.allowed_clientapp("f" * 64) == OTHER_CLIENTAPP


@pytest.mark.parametrize(
    "ref", ["benchmarks.apps.compare_client", "os:system; rm -rf /", "../x:app", ":app", "a:"]
)
def test_only_plain_clientapp_references_can_be_allowed(tmp_path: Path, ref: str) -> None:
    store = ApprovalStore(tmp_path)
    with pytest.raises(ApprovalError, match="ClientApp reference"):
        store.allow_fab("a" * 64, clientapp=ref)
    with pytest.raises(BundleRefusedError, match="not a ClientApp reference"):
        load_clientapp(ref)
    assert store.allowed_fabs() == {}


def test_a_hash_listed_with_two_clientapps_allows_nothing(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path)
    fab = _fab(OTHER_CLIENTAPP)
    path = tmp_path / "federation" / "allowed-fabs.txt"
    path.parent.mkdir(parents=True)
    path.write_text(f"{_sha(fab)} {OTHER_CLIENTAPP}\n{_sha(fab)} somewhere.else:app\n")
    assert store.allowed_fabs() == {}
    with pytest.raises(BundleRefusedError, match="not allowed"):
        check_bundle(fab, store)


def test_load_clientapp_refuses_what_is_not_a_clientapp() -> None:
    with pytest.raises(BundleRefusedError, match="is not a ClientApp"):
        load_clientapp("site_node.federation.clientapp:site_settings")


def _run_guarded(monkeypatch: pytest.MonkeyPatch, state_dir: Path, fab: bytes) -> Callable[[], Any]:
    """Run :func:`guarded_clientapp_main` with Flower's runner replaced by one that
    installs ``fab`` and returns the loader Flower would call next."""
    from flwr.supernode.runtime import run_clientapp as runner

    # guarded_clientapp_main replaces these two; put them back after the test.
    monkeypatch.setattr(runner, "install_from_fab", runner.install_from_fab)
    monkeypatch.setattr(runner, "get_load_client_app_fn", runner.get_load_client_app_fn)
    seen: dict[str, Any] = {}

    def fake_run_clientapp(**kwargs: Any) -> None:
        seen["kwargs"] = kwargs
        try:
            runner.install_from_fab(fab, skip_prompt=True)
        except BundleRefusedError as exc:
            seen["refused"] = exc
        load = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        seen["load"] = lambda: load("concord/compare", "1.0.0", _sha(fab))

    monkeypatch.setattr(runner, "run_clientapp", fake_run_clientapp)
    guarded_clientapp_main(state_dir, ["--insecure", "--token", "t"])
    assert seen["kwargs"]["runtime_dependency_install"] is False
    if "refused" in seen:
        raise seen["refused"]
    load: Callable[[], Any] = seen["load"]
    return load


def test_the_guarded_runner_loads_the_clientapp_the_accepted_bundle_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.apps import compare_client
    from site_node.federation import clientapp

    store = ApprovalStore(tmp_path)
    other = _fab(OTHER_CLIENTAPP)
    store.allow_fab(_sha(other), clientapp=OTHER_CLIENTAPP)

    assert _run_guarded(monkeypatch, tmp_path, build_fab_from_disk(APP_DIR))() is clientapp.app
    assert _run_guarded(monkeypatch, tmp_path, other)() is compare_client.app


def test_the_guarded_runner_loads_nothing_for_a_refused_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fab = _fab(f"{UNKNOWN_MODULE}:app")
    with pytest.raises(BundleRefusedError, match="not allowed"):
        _run_guarded(monkeypatch, tmp_path, fab)

    from flwr.supernode.runtime import run_clientapp as runner

    monkeypatch.setattr(runner, "install_from_fab", runner.install_from_fab)
    monkeypatch.setattr(runner, "get_load_client_app_fn", runner.get_load_client_app_fn)
    loads: list[Callable[[], Any]] = []

    def no_install(**kwargs: Any) -> None:  # Flower never got to install: nothing checked
        load = runner.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        loads.append(lambda: load("x", "1", _sha(fab)))

    monkeypatch.setattr(runner, "run_clientapp", no_install)
    guarded_clientapp_main(tmp_path, ["--insecure", "--token", "t"])
    with pytest.raises(BundleRefusedError, match="no checked app bundle"):
        loads[0]()
    assert UNKNOWN_MODULE not in sys.modules


def test_flower_names_the_runner_replaces_still_exist(tmp_path: Path) -> None:
    from flwr.supernode.runtime import run_clientapp as runner

    assert callable(runner.install_from_fab)
    assert callable(runner.get_load_client_app_fn)
    assert callable(runner.run_clientapp)
    shim = write_runner_shim(tmp_path / "bin", tmp_path / "state")
    assert shim.name == "flwr-clientapp"
    assert shim.stat().st_mode & 0o111
    assert "guarded_clientapp_main" in shim.read_text()
