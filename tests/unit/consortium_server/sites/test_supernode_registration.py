"""Enrolment registers the site's SuperNode key with the SuperLink; revocation unregisters
it. The SuperLink here is a recording stand-in for the registry interface; the real
``flwr`` path is exercised by the demo and the drills, whose SuperNodes are only admitted
because enrolment registered them."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consortium_server.federation.supernodes import SuperLinkRefusedError
from tests.support.cli import run_cli
from tests.support.studies import audit_actions
from tests.support.world import People, site_enrolment


class RecordingSuperLink:
    """Registers keys in a dict; ``refuse`` makes the next call fail like the CLI would."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.refuse = False
        self._next = 1000

    def register(self, public_key: str, *, name: str) -> str:
        if self.refuse:
            raise SuperLinkRefusedError(f"The SuperLink did not register the key of {name}: no")
        if public_key in self.nodes.values():
            raise SuperLinkRefusedError("already registered")
        self._next += 1
        self.nodes[str(self._next)] = public_key
        return str(self._next)

    def unregister(self, node_id: str) -> None:
        if self.refuse:
            raise SuperLinkRefusedError(f"The SuperLink did not unregister {node_id}: down")
        del self.nodes[node_id]


def _enrol(client: TestClient, people: People, site_id: str) -> Any:
    return client.post(
        "/api/v1/sites",
        json=site_enrolment(site_id, f"Hospital {site_id}"),
        headers=people.admin,
    )


def test_enrolment_registers_the_supernode_key(
    client: TestClient, people: People, app: FastAPI
) -> None:
    link = RecordingSuperLink()
    app.state.supernode_registry = link
    response = _enrol(client, people, "hospital-x")
    assert response.status_code == 201, response.text
    site = response.json()
    assert link.nodes == {site["supernode_node_id"]: site["supernode_public_key"]}
    shown = client.get("/api/v1/sites/hospital-x", headers=people.admin).json()
    assert shown["supernode_node_id"] == site["supernode_node_id"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("ssh-foo AAAAB3NzaC1yc2EAAAADAQAB x", "not an OpenSSH public key"),  # unknown type
        ("ecdsa-sha2-nistp256 bm90IGEga2V5 x", "not an OpenSSH public key"),
        ("not a key at all", "not an OpenSSH public key"),
    ],
    ids=["unknown-key-type", "garbled-ecdsa", "garbage"],
)
def test_an_unusable_supernode_key_is_a_422_and_enrols_nothing(
    client: TestClient, people: People, app: FastAPI, key: str, message: str
) -> None:
    app.state.supernode_registry = RecordingSuperLink()
    body = {**site_enrolment("hospital-y", "Hospital Y"), "supernode_public_key": key}
    response = client.post("/api/v1/sites", json=body, headers=people.admin)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["request_id"]
    assert message in str(error)
    assert client.get("/api/v1/sites/hospital-y", headers=people.admin).status_code == 404


def test_a_key_the_superlink_refuses_enrols_nothing(
    client: TestClient, people: People, app: FastAPI
) -> None:
    link = RecordingSuperLink()
    link.refuse = True
    app.state.supernode_registry = link
    response = _enrol(client, people, "hospital-x")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "federation.superlink_error"
    assert "did not register" in response.json()["error"]["message"]
    assert client.get("/api/v1/sites/hospital-x", headers=people.admin).status_code == 404
    assert "site.enrolled" not in audit_actions(app, "hospital-x")
    link.refuse = False  # the operator fixes the SuperLink and enrols again
    assert _enrol(client, people, "hospital-x").status_code == 201


def test_revocation_unregisters_the_supernode(
    client: TestClient, people: People, app: FastAPI
) -> None:
    link = RecordingSuperLink()
    app.state.supernode_registry = link
    node = _enrol(client, people, "hospital-x").json()["supernode_node_id"]
    response = client.post(
        "/api/v1/sites/hospital-x/revoke",
        json={"reason": "Decommissioned."},
        headers=people.admin,
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    assert response.json()["supernode_node_id"] is None
    assert link.nodes == {}
    entry = _last_entry(app, "site.revoked")
    assert entry.details["supernode_node_id"] == node
    assert entry.details["supernode_unregistered"] is True


def test_revocation_stands_when_the_superlink_is_down(
    client: TestClient, people: People, app: FastAPI
) -> None:
    link = RecordingSuperLink()
    app.state.supernode_registry = link
    node = _enrol(client, people, "hospital-x").json()["supernode_node_id"]
    link.refuse = True
    response = client.post(
        "/api/v1/sites/hospital-x/revoke",
        json={"reason": "Credentials leaked."},
        headers=people.admin,
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    assert response.json()["supernode_node_id"] == node  # still registered: say so
    entry = _last_entry(app, "site.revoked")
    assert entry.details["supernode_unregistered"] is False
    assert "down" in entry.details["supernode_error"]


def _last_entry(app: FastAPI, action: str) -> Any:
    log = app.state.audit_log
    with app.state.sessionmaker() as session:
        entries = [
            log.get_entry(i, session=session).entry for i in range(log.size(session=session))
        ]
    return [e for e in entries if e.action == action][-1]


def test_the_cli_says_whether_the_key_was_registered(
    client: TestClient, people: People, app: FastAPI, tmp_path: Any, monkeypatch: Any
) -> None:
    import yaml

    enrolment = tmp_path / "enrolment.yaml"
    enrolment.write_text(yaml.safe_dump(site_enrolment("hospital-x", "Hospital X")))
    code, out = run_cli(client, monkeypatch, people.admin, "site", "enrol", str(enrolment))
    assert code == 0, out
    assert "not registered" in out  # this app has no SuperLink
    app.state.supernode_registry = RecordingSuperLink()
    enrolment.write_text(yaml.safe_dump(site_enrolment("hospital-y", "Hospital Y")))
    code, out = run_cli(client, monkeypatch, people.admin, "site", "enrol", str(enrolment))
    assert code == 0, out
    assert "node id 1001" in out
