"""Witness: each agent cosigns the latest tree head, checks consistency from the last head
it cosigned, and the server stores the cosignatures."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from site_node.agent.cosigner import WitnessRefusedError
from site_node.agent.loop import verify_audit
from site_node.agent.sync import AgentError
from site_node.agent.witness import PINNED_KEY_FILE, PINNED_LOG_FILE, STATE_FILE, cosign_latest
from site_node.settings import SiteSettings
from tests.unit.site_node.agent.conftest import World, token


def _latest(world: World) -> dict[str, Any]:
    r = world.client.get("/api/v1/audit/heads/latest", headers=world.people.compliance)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_witness_cosigns_and_the_server_stores_the_cosignature(world: World) -> None:
    a = world.sites["a"]
    first = cosign_latest(
        a.api, site_id=a.site_id, signing_key=a.keys.signing_key, state_dir=a.state_dir
    )
    assert first.cosigned
    assert first.trusted_on_first_use
    head = _latest(world)
    assert head["tree_size"] == first.tree_size
    assert [c["site_id"] for c in head["cosignatures"]] == ["hospital-a"]
    assert (a.state_dir / STATE_FILE).is_file()
    assert (a.state_dir / PINNED_KEY_FILE).read_text().strip() == head["server_public_key"]

    # The log grows; the next cosignature needs a consistency proof from the last head.
    world.submit_study()
    a.transport.requests.clear()
    second = cosign_latest(
        a.api, site_id=a.site_id, signing_key=a.keys.signing_key, state_dir=a.state_dir
    )
    assert second.cosigned
    assert not second.trusted_on_first_use
    assert second.tree_size > first.tree_size
    assert any(path == "/api/v1/audit/consistency" for _, path, _ in a.transport.requests)
    assert "hospital-a" in {c["site_id"] for c in _latest(world)["cosignatures"]}


def test_three_witnesses_make_the_head_witnessed(world: World) -> None:
    for site in world.sites.values():
        assert site.agent.run_pass().ok
    head = _latest(world)
    cosigned = {c["site_id"] for c in head["cosignatures"]}
    # Cosigning appends no audit entries, so the last agent's head is the latest one.
    assert cosigned == {"hospital-a", "hospital-b", "hospital-c"}
    assert head["witnessed"] is True


def test_configured_head_key_that_the_server_does_not_use_is_refused(world: World) -> None:
    a = world.sites["a"]
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(AgentError) as refused:
        cosign_latest(
            a.api,
            site_id=a.site_id,
            signing_key=a.keys.signing_key,
            state_dir=a.state_dir,
            server_head_key=base64.b64encode(other).decode(),
        )
    assert refused.value.code == "agent.server_key_changed"
    assert not (a.state_dir / STATE_FILE).exists()


def test_rewritten_log_is_not_cosigned(world: World) -> None:
    a = world.sites["a"]
    cosign_latest(a.api, site_id=a.site_id, signing_key=a.keys.signing_key, state_dir=a.state_dir)
    world.submit_study()

    def lie(request: httpx.Request, body: Any) -> Any:
        if request.url.path == "/api/v1/audit/consistency":
            body["proof"] = ["00" * 32 for _ in body["proof"]]
        return body

    a.transport.rewrite = lie
    with pytest.raises(WitnessRefusedError) as refused:
        cosign_latest(
            a.api, site_id=a.site_id, signing_key=a.keys.signing_key, state_dir=a.state_dir
        )
    assert refused.value.code == "audit.tree_inconsistent"
    report = a.agent.run_pass()
    assert [(s.name, s.code) for s in report.steps if not s.ok] == [
        ("witness", "audit.tree_inconsistent")
    ]


def test_audit_verify_checks_without_cosigning(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = world.sites["a"]
    for name, value in {
        "CONCORD_SITE_SITE_ID": a.site_id,
        "CONCORD_SITE_STATE_DIR": str(a.state_dir),
        "CONCORD_SITE_TOKEN": token(world.people, "a"),
        "CONCORD_SITE_API_URL": "http://testserver",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(AgentError) as unpinned:  # nothing trusted yet: nothing to check
        verify_audit(SiteSettings(), transport=a.transport)
    assert unpinned.value.code == "agent.no_server_key"

    cosigned = cosign_latest(
        a.api, site_id=a.site_id, signing_key=a.keys.signing_key, state_dir=a.state_dir
    )
    world.submit_study()
    state = (a.state_dir / STATE_FILE).read_bytes()
    size, last = verify_audit(SiteSettings(), transport=a.transport)
    assert last == cosigned.tree_size
    assert size > last
    assert (a.state_dir / STATE_FILE).read_bytes() == state  # read-only
    assert "hospital-a" not in {c["site_id"] for c in _latest(world)["cosignatures"]}

    def lie(request: httpx.Request, body: Any) -> Any:
        if request.url.path == "/api/v1/audit/consistency":
            body["proof"] = ["11" * 32 for _ in body["proof"]]
        return body

    a.transport.rewrite = lie
    with pytest.raises(WitnessRefusedError):
        verify_audit(SiteSettings(), transport=a.transport)


def test_the_log_identity_is_pinned_and_a_change_is_refused(world: World) -> None:
    a = world.sites["a"]
    args = {"site_id": a.site_id, "signing_key": a.keys.signing_key, "state_dir": a.state_dir}
    cosign_latest(a.api, **args)
    assert (a.state_dir / PINNED_LOG_FILE).read_text().strip() == _latest(world)["log_id"]
    cosig = next(c for c in _latest(world)["cosignatures"] if c["site_id"] == a.site_id)
    assert (cosig["version"], cosig["log_id"]) == (2, _latest(world)["log_id"])

    def rename(request: httpx.Request, body: Any) -> Any:
        if request.url.path == "/api/v1/audit/heads/latest":
            body["log_id"] = "another.consortium/audit"
        return body

    a.transport.rewrite = rename
    world.submit_study()
    with pytest.raises(AgentError) as changed:
        cosign_latest(a.api, **args)
    assert changed.value.code == "agent.log_id_changed"
    # A log id configured by hospital IT wins over the pin and over what the server says.
    with pytest.raises(AgentError) as configured:
        cosign_latest(a.api, audit_log_id="concord.example.org/audit", **args)
    assert configured.value.code == "agent.log_id_changed"
