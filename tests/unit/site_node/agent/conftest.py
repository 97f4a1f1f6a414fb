"""Fixtures for the site agent: the in-process consortium app and three hospitals whose
private keys the tests hold, each with its own state dir and an API client for its
``site_node`` identity."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from concord_protocol.client import ConsortiumClient
from site_node.agent.loop import LOGGER_NAME, SiteAgent
from site_node.crypto.sealing import SiteKeyPair
from site_node.federation.approvals import ApprovalStore
from site_node.peers import PeerStore, own_keys
from site_node.site_policy import site_engine
from site_node.studies import StudyReview, decide_study, review_study
from tests.support.world import People, dataset_body, study_contract
from tests.unit.consortium_server.conftest import app, client, people, settings

__all__ = ["app", "client", "people", "settings"]  # server fixtures, re-exported

LETTERS = ("a", "b", "c")


@pytest.fixture(autouse=True)
def _agent_logger() -> Iterator[None]:
    """`site-node run` points the agent's logger at its stderr; put it back afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers, logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.fixture
def db_backend() -> str:
    """The agent's behaviour does not depend on the server's database: SQLite only."""
    return "sqlite"


class Recorder(httpx.BaseTransport):
    """Wraps the app's transport: records requests; can fail or rewrite some of them."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str, bytes]] = []
        self.fail_next: list[int | Exception] = []
        #: path suffix -> status: the first request whose path ends so gets that answer
        self.fail_once: dict[str, int] = {}
        self.rewrite: Callable[[httpx.Request, dict[str, Any]], dict[str, Any]] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.requests.append((request.method, request.url.path, body))
        once = next((p for p in self.fail_once if request.url.path.endswith(p)), None)
        if self.fail_next or once is not None:
            failure = self.fail_once.pop(once) if once is not None else self.fail_next.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return httpx.Response(
                failure,
                json={"error": {"code": "service.unavailable", "message": "try later"}},
                request=request,
            )
        response = self.inner.handle_request(request)
        if self.rewrite is None or request.method != "GET":
            return response
        response.read()
        try:
            data = response.json()
        except ValueError:
            return response
        data = self.rewrite(request, data)
        return httpx.Response(response.status_code, json=data, request=request)

    def posts(self) -> list[str]:
        """Paths of the POST requests seen so far."""
        return [path for method, path, _ in self.requests if method == "POST"]


@dataclass
class Hospital:
    """One site: its id, keys, state dir, store, recording transport and agent."""

    letter: str
    site_id: str
    keys: SiteKeyPair
    state_dir: Path
    store: ApprovalStore
    transport: Recorder
    api: ConsortiumClient
    agent: SiteAgent


@dataclass
class World:
    """The consortium as the tests drive it."""

    client: TestClient
    people: People
    sites: dict[str, Hospital]

    def submit_study(self, *, approve: tuple[str, ...] = LETTERS, **draft: Any) -> tuple[str, str]:
        """Submit a study over bc-a/b/c; the sites of ``approve`` approve it as
        ``site-node study approve`` does (review, sign, store, post)."""
        contract = study_contract([f"bc-{x}" for x in LETTERS]) | draft
        r = self.client.post("/api/v1/studies", json=contract, headers=self.people.researcher)
        assert r.status_code == 201, r.text
        study = r.json()
        for x in approve:
            self.approve(x, study["id"])
        return str(study["id"]), str(study["contract_hash"])

    def review(self, letter: str, study_id: str) -> StudyReview:
        """The site's review of a study (``site-node study show``)."""
        site = self.sites[letter]
        return review_study(
            site.api,
            study_id,
            site_id=site.site_id,
            keys=site.keys,
            peers=PeerStore(site.state_dir),
            engine=site_engine(None, site_id=site.site_id),
        )

    def approve(self, letter: str, study_id: str) -> None:
        """The site approves the study (``site-node study approve``)."""
        site = self.sites[letter]
        review = self.review(letter, study_id)
        _, posted = decide_study(
            site.api,
            review,
            decision="approved",
            contract_hash=review.contract_hash,
            reason="",
            site_id=site.site_id,
            keys=site.keys,
            store=site.store,
        )
        assert posted

    def study(self, study_id: str) -> dict[str, Any]:
        r = self.client.get(f"/api/v1/studies/{study_id}", headers=self.people.admin)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def token(people: People, letter: str) -> str:
    """The raw bearer token of a hospital's ``site_node`` identity."""
    return people.node(letter)["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def world(client: TestClient, people: People, tmp_path: Path) -> Iterator[World]:
    """Three enrolled hospitals (keys generated here), one dataset each, and their agents."""
    sites: dict[str, Hospital] = {}
    for x in LETTERS:
        site_id = f"hospital-{x}"
        pair = SiteKeyPair.generate()
        state_dir = tmp_path / f"site-{x}"
        pair.save(state_dir / "keys")
        supernode = ec.generate_private_key(ec.SECP384R1()).public_key()
        body = {
            "id": site_id,
            "organisation": f"Hospital {x}",
            "display_name": f"Hospital {x}",
            "contact_email": f"it@{site_id}.example.org",
            "signing_public_key": pair.signing_public_b64,
            "exchange_public_key": pair.exchange_public_b64,
            "supernode_public_key": supernode.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ).decode(),
        }
        r = client.post("/api/v1/sites", json=body, headers=people.admin)
        assert r.status_code == 201, r.text
        r = client.post(
            "/api/v1/datasets", json=dataset_body(f"bc-{x}", site_id), headers=people.steward(x)
        )
        assert r.status_code == 201, r.text
        transport = Recorder(client._transport)
        api = ConsortiumClient("http://testserver", token(people, x), transport=transport)
        agent = SiteAgent(
            api,
            site_id=site_id,
            site_keys=pair,
            state_dir=state_dir,
            retry_base_s=0.0,
            sleep=lambda _s: None,
        )
        sites[x] = Hospital(
            x, site_id, pair, state_dir, ApprovalStore(state_dir), transport, api, agent
        )
    # Each hospital's IT pins the others, with the fingerprints read to them by phone.
    for site in sites.values():
        for peer in sites.values():
            if peer is not site:
                PeerStore(site.state_dir).pin(
                    peer.site_id,
                    own_keys(peer.site_id, peer.keys).fingerprint,
                    {
                        "signing_public_key": peer.keys.signing_public_b64,
                        "exchange_public_key": peer.keys.exchange_public_b64,
                    },
                )
    yield World(client, people, sites)
    for site in sites.values():
        site.api.close()
