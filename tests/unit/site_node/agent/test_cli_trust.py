"""``site-node keys fingerprint|rotate``, ``site-node peers`` and ``site-node study``: the
commands hospital IT and data stewards run, against the in-process consortium."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from concord_protocol.audit.cosignatures import Cosignature
from concord_protocol.audit.heads import encode_public_key
from concord_protocol.audit.trusted_keys import load_site_keys
from concord_protocol.client import ConsortiumClient
from concord_protocol.site_keys import format_fingerprint
from site_node.cli import app as cli
from site_node.peers import PeerStore, own_keys
from tests.support.world import study_contract
from tests.unit.site_node.agent.conftest import World, token


@pytest.fixture
def as_site(world: World, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run the CLI as hospital ``letter``: its settings, and its API client in process."""

    def run(letter: str, *args: str) -> tuple[int, str]:
        site = world.sites[letter]

        def client(settings: object, **_: object) -> ConsortiumClient:
            return ConsortiumClient(
                "http://testserver", token(world.people, letter), transport=site.transport
            )

        monkeypatch.setattr("site_node.agent.loop.consortium_client", client)
        env = {
            "CONCORD_SITE_SITE_ID": site.site_id,
            "CONCORD_SITE_STATE_DIR": str(site.state_dir),
            "CONCORD_SITE_API_URL": "http://testserver",
            "CONCORD_SITE_TOKEN": token(world.people, letter),
            "COLUMNS": "200",  # rich wraps at the terminal width
        }
        result = CliRunner().invoke(cli, list(args), env=env)
        return result.exit_code, result.output

    return run


def test_keys_fingerprint_prints_what_peers_pin(world: World, as_site) -> None:  # type: ignore[no-untyped-def]
    code, out = as_site("a", "keys", "fingerprint")
    assert code == 0, out
    expected = format_fingerprint(own_keys("hospital-a", world.sites["a"].keys).fingerprint)
    assert out.strip() == expected


def test_peers_pin_refuses_a_fingerprint_the_directory_does_not_match(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
) -> None:
    PeerStore(world.sites["a"].state_dir).unpin("hospital-b")
    code, out = as_site("a", "peers", "pin", "hospital-b", "ab" * 32)
    assert code == 1
    assert "nothing was pinned" in out
    assert PeerStore(world.sites["a"].state_dir).get("hospital-b") is None
    fingerprint = format_fingerprint(own_keys("hospital-b", world.sites["b"].keys).fingerprint)
    code, out = as_site("a", "peers", "pin", "hospital-b", fingerprint)
    assert code == 0, out
    assert "pinned" in out
    code, out = as_site("a", "peers", "list")
    assert code == 0, out
    assert "hospital-b" in out
    assert "agrees" in out


def test_peers_pin_of_an_unknown_site_is_a_clear_error(as_site) -> None:  # type: ignore[no-untyped-def]
    code, out = as_site("a", "peers", "pin", "hospital-z", "ab" * 32)
    assert code == 1
    assert "no site 'hospital-z'" in out


def test_study_show_then_approve_signs_and_records_the_decision(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
) -> None:
    response = world.client.post(
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=world.people.researcher,
    )
    study = response.json()
    code, out = as_site("a", "study", "show", study["id"])
    assert code == 0, out
    assert "Approvable here" in out
    assert study["contract_hash"] in out
    code, out = as_site("a", "study", "approve", study["id"], "--hash", "0" * 64)
    assert code == 1
    assert "not the contract hash this site reviewed" in out
    code, out = as_site(
        "a", "study", "approve", study["id"], "--hash", study["contract_hash"], "--reason", "DAC"
    )
    assert code == 0, out
    assert "recorded" in out
    shown = world.study(study["id"])
    row = next(s for s in shown["sites"] if s["site_id"] == "hospital-a")
    assert row["decision"] == "approved"
    assert row["signature"]
    code, out = as_site("b", "study", "show", study["id"])
    assert code == 0, out
    assert "signature verified" in out


def test_study_show_of_a_study_over_the_sites_policy_exits_1_with_reasons(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
) -> None:
    draft = study_contract(["bc-a", "bc-b", "bc-c"]) | {
        "training": {"rounds": 150, "local_epochs": 1, "batch_size": 64, "learning_rate": 0.1}
    }
    study = world.client.post("/api/v1/studies", json=draft, headers=world.people.researcher).json()
    assert study["state"] == "awaiting_approvals", study
    code, out = as_site("a", "study", "show", study["id"])
    assert code == 1
    assert "at most 100 rounds" in out
    code, out = as_site("a", "study", "approve", study["id"], "--hash", study["contract_hash"])
    assert code == 1
    assert "cannot approve" in out


def test_keys_rotate_moves_the_peers_pins_on_their_next_pass(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
) -> None:
    from site_node.crypto.sealing import SiteKeyPair

    old = own_keys("hospital-a", world.sites["a"].keys).fingerprint
    code, out = as_site("a", "keys", "rotate")
    assert code == 0, out
    new_keys = SiteKeyPair.load(world.sites["a"].state_dir / "keys")
    new = own_keys("hospital-a", new_keys).fingerprint
    assert new != old
    assert format_fingerprint(new) in out
    assert (world.sites["a"].state_dir / "keys" / f"previous-{old[:16]}").is_dir()
    report = world.sites["b"].agent.run_pass()
    assert report.peers is not None
    assert report.peers.rotated == {"hospital-a": new}
    pin = PeerStore(world.sites["b"].state_dir).get("hospital-a")
    assert pin is not None
    assert pin.fingerprint == new


# --- site-node peers export-keys / audit verify --file -------------------------------------


def _cosign_everywhere(world: World) -> None:
    from site_node.agent.witness import cosign_latest

    for site in world.sites.values():
        cosign_latest(
            site.api,
            site_id=site.site_id,
            signing_key=site.keys.signing_key,
            state_dir=site.state_dir,
        )


def _export(world: World, path: Path) -> dict[str, Any]:
    response = world.client.get("/api/v1/audit/export", headers=world.people.compliance)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    path.write_text(json.dumps(body))
    return body


def test_peers_export_keys_writes_the_pinned_keys_not_the_directory(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    PeerStore(world.sites["a"].state_dir).unpin("hospital-c")
    code, out = as_site("a", "peers", "export-keys")
    assert code == 0, out
    keys = json.loads(out)
    assert keys == {
        "hospital-a": [world.sites["a"].keys.signing_public_b64],
        "hospital-b": [world.sites["b"].keys.signing_public_b64],
    }
    code, out = as_site("a", "peers", "export-keys", str(tmp_path / "keys.json"))
    assert code == 0, out
    assert load_site_keys(tmp_path / "keys.json") == keys


def test_audit_verify_file_checks_an_export_with_the_sites_own_trust(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    world.submit_study()
    _cosign_everywhere(world)
    clean = tmp_path / "export.json"
    body = _export(world, clean)
    code, out = as_site("a", "audit", "verify", "--file", str(clean), "--quorum", "3")
    assert code == 0, out
    assert "OK" in out

    # The export's keys are not the site's trust: swap hospital-b's key and cosignatures.
    forged = json.loads(json.dumps(body))
    attacker = Ed25519PrivateKey.generate()
    for site in forged["sites"]:
        if site["site_id"] == "hospital-b":
            site["signing_public_key"] = encode_public_key(attacker.public_key())
    for cosig in forged["cosignatures"]:
        if cosig["site_id"] == "hospital-b":
            message = Cosignature.model_validate(cosig).message()
            cosig["signature"] = base64.b64encode(attacker.sign(message)).decode("ascii")
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    code, out = as_site("a", "audit", "verify", "--file", str(tmp_path / "forged.json"))
    assert code == 1, out
    assert "cosignature_invalid" in out

    # Cut short before the head hospital-a cosigned: every signature left still verifies,
    # but the site knows the head it witnessed.
    witnessed = max(h["tree_size"] for h in body["heads"])
    cut = json.loads(json.dumps(body))
    cut["entries"] = cut["entries"][: witnessed - 1]
    cut["heads"] = [h for h in cut["heads"] if h["tree_size"] < witnessed]
    cut["cosignatures"] = [c for c in cut["cosignatures"] if c["tree_size"] < witnessed]
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    code, out = as_site("a", "audit", "verify", "--file", str(tmp_path / "cut.json"))
    assert code == 1, out
    assert "export_truncated" in out

    code, out = as_site("a", "audit", "verify", "--file", str(tmp_path / "missing.json"))
    assert code == 2
    assert "no such file" in out


def test_cosignatures_made_before_a_key_rotation_still_verify_with_the_sites_trust(
    world: World,
    as_site,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    from site_node.agent.witness import cosign_latest
    from site_node.crypto.sealing import SiteKeyPair

    world.submit_study()
    _cosign_everywhere(world)  # hospital-a cosigns with the key it is about to replace
    old_key = world.sites["a"].keys.signing_public_b64
    code, out = as_site("a", "keys", "rotate")
    assert code == 0, out
    new_key = SiteKeyPair.load(world.sites["a"].state_dir / "keys").signing_public_b64
    world.sites["b"].agent.run_pass()  # follows the signed rotation
    pin = PeerStore(world.sites["b"].state_dir).get("hospital-a")
    assert pin is not None
    assert (pin.keys.signing_public_key, pin.previous_signing_keys) == (new_key, (old_key,))
    grown = world.client.post(  # the log grows: a new head for b and c to cosign
        "/api/v1/studies",
        json=study_contract(["bc-a", "bc-b", "bc-c"]),
        headers=world.people.researcher,
    )
    assert grown.status_code == 201, grown.text
    for letter in ("b", "c"):
        site = world.sites[letter]
        cosign_latest(
            site.api,
            site_id=site.site_id,
            signing_key=site.keys.signing_key,
            state_dir=site.state_dir,
        )
    export = tmp_path / "export.json"
    _export(world, export)
    for letter in ("a", "b"):  # a from its own previous-* keys, b from what it followed
        code, out = as_site(letter, "audit", "verify", "--file", str(export), "--quorum", "2")
        assert code == 0, (letter, out)
    code, out = as_site("b", "peers", "export-keys")
    assert json.loads(out)["hospital-a"] == [new_key, old_key]
    # Without the earlier key the honest log would fail: the older cosignature is a's.
    peers_file = world.sites["b"].state_dir / "peers.json"
    body = json.loads(peers_file.read_text())
    body["peers"]["hospital-a"]["previous_signing_keys"] = []
    peers_file.write_text(json.dumps(body))
    code, out = as_site("b", "audit", "verify", "--file", str(export))
    assert code == 1, out
    assert "cosignature_invalid" in out
