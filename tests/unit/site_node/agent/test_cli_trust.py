"""``site-node keys fingerprint|rotate``, ``site-node peers`` and ``site-node study``: the
commands hospital IT and data stewards run, against the in-process consortium."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

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
