"""Key exchange between three agents through the in-process server: the contract's key
generator seals the key to the roster's pinned keys, the others open it with the
generator's pinned key, and the server never sees the key nor can it substitute keys."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from concord_protocol.errors import ContextError
from concord_protocol.wire.ckks import load_context
from site_node.agent.loop import SiteAgent
from site_node.crypto.sealing import SiteKeyPair
from tests.unit.site_node.agent.conftest import World


def test_three_agents_end_with_the_same_key_and_the_server_never_holds_it(world: World) -> None:
    study_id, _ = world.submit_study()
    a, b, c = (world.sites[x] for x in ("a", "b", "c"))

    # b comes first: it has to wait for the contract's key generator (a).
    first = b.agent.run_pass()
    assert first.ok, first.steps
    assert first.keys is not None
    assert first.keys.waiting == [study_id]
    assert b.store.study_key(study_id) is None

    generated = a.agent.run_pass()
    assert generated.keys is not None
    assert generated.keys.generated == [study_id]
    received_b = b.agent.run_pass()
    received_c = c.agent.run_pass()
    assert received_b.keys is not None
    assert received_b.keys.received == [study_id]
    assert received_c.keys is not None
    assert received_c.keys.received == [study_id]

    keys = {s.site_id: s.store.study_key(study_id) for s in (a, b, c)}
    assert all(k is not None for k in keys.values())
    assert len({k.key_fingerprint for k in keys.values() if k is not None}) == 1
    secrets = {k.secret_context for k in keys.values() if k is not None}
    assert len(secrets) == 1
    secret = secrets.pop()
    assert {k.sender_id for k in keys.values() if k is not None} == {"hospital-a"}

    [upload] = [
        body
        for method, path, body in a.transport.requests
        if method == "POST" and path == f"/api/v1/studies/{study_id}/keys"
    ]
    posted = json.loads(upload)
    public = base64.b64decode(posted["public_context"])
    with pytest.raises(ContextError):
        load_context(public, require_secret=True)
    assert {k["recipient_id"] for k in posted["sealed_keys"]} == {"hospital-b", "hospital-c"}
    for site in (a, b, c):
        for _, _, body in site.transport.requests:
            assert base64.b64encode(secret) not in body
            assert secret[:4096] not in body


def test_the_contract_names_the_generator_not_the_smallest_site_id(world: World) -> None:
    study_id, _ = world.submit_study(key_generator="hospital-c")
    a, c = world.sites["a"], world.sites["c"]
    first = a.agent.run_pass()
    assert first.keys is not None
    assert first.keys.waiting == [study_id]
    generated = c.agent.run_pass()
    assert generated.keys is not None
    assert generated.keys.generated == [study_id]
    received = a.agent.run_pass()
    assert received.keys is not None
    assert received.keys.received == [study_id]


def test_a_swapped_key_in_the_directory_is_never_used(world: World) -> None:
    """Attack: the server serves the generator its own X25519 key as b's. The generator
    seals to b's pinned key anyway, so b opens it and the server can open nothing; the
    peers step reports the directory's change."""
    study_id, _ = world.submit_study()
    a, b = world.sites["a"], world.sites["b"]
    server_keys = SiteKeyPair.generate()

    def swap(request: httpx.Request, body: Any) -> Any:
        if request.url.path == "/api/v1/sites":
            for entry in body:
                if entry["id"] == "hospital-b":
                    entry["exchange_public_key"] = server_keys.exchange_public_b64
                    entry["signing_public_key"] = server_keys.signing_public_b64
        return body

    a.transport.rewrite = swap
    report = a.agent.run_pass()
    assert report.peers is not None
    assert report.peers.refused == {"hospital-b": "peers.key_mismatch"}
    assert report.keys is not None
    assert report.keys.generated == [study_id]
    received = b.agent.run_pass()
    assert received.keys is not None
    assert received.keys.received == [study_id]
    held_a, held_b = a.store.study_key(study_id), b.store.study_key(study_id)
    assert held_a is not None
    assert held_b is not None
    assert held_a.key_fingerprint == held_b.key_fingerprint


def test_a_key_relayed_from_a_site_that_is_not_the_generator_is_refused(world: World) -> None:
    study_id, _ = world.submit_study()
    a, b = world.sites["a"], world.sites["b"]
    assert a.agent.run_pass().ok

    def forge(request: httpx.Request, body: Any) -> Any:
        if request.url.path.endswith("/keys/mine"):
            body["sender_site_id"] = "hospital-c"
        return body

    b.transport.rewrite = forge
    report = b.agent.run_pass()
    assert not report.ok
    assert report.keys is not None
    assert report.keys.failed == {study_id: "agent.key_sender_not_approved"}
    assert b.store.study_key(study_id) is None


def test_a_relay_naming_another_signing_key_than_the_pinned_one_is_refused(
    world: World,
) -> None:
    study_id, _ = world.submit_study()
    a, b = world.sites["a"], world.sites["b"]
    assert a.agent.run_pass().ok

    def forge(request: httpx.Request, body: Any) -> Any:
        if request.url.path.endswith("/keys/mine"):
            body["sender_signing_public_key"] = b.keys.signing_public_b64
        return body

    b.transport.rewrite = forge
    report = b.agent.run_pass()
    assert not report.ok
    assert report.keys is not None
    assert report.keys.failed == {study_id: "agent.sender_key_mismatch"}
    assert b.store.study_key(study_id) is None


def test_restarted_generator_keeps_its_key_and_does_not_upload_twice(world: World) -> None:
    study_id, _ = world.submit_study()
    a = world.sites["a"]
    assert a.agent.run_pass().ok
    held = a.store.study_key(study_id)
    assert held is not None
    a.transport.requests.clear()

    restarted = SiteAgent(  # a new process on the same state dir
        a.api, site_id=a.site_id, site_keys=a.keys, state_dir=a.state_dir, retry_base_s=0.0
    )
    report = restarted.run_pass()

    assert report.keys is not None
    assert report.keys.unchanged == [study_id]
    assert not any(path.endswith("/keys") for path in a.transport.posts())
    again = a.store.study_key(study_id)
    assert again is not None
    assert again.key_fingerprint == held.key_fingerprint
