"""Key exchange between three agents through the in-process server: the smallest approved
site generates, the others open what was sealed to them, and the server never sees the key."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from concord_protocol.errors import ContextError
from concord_protocol.wire.ckks import load_context
from site_node.agent.key_exchange import generating_site
from site_node.agent.loop import SiteAgent
from tests.unit.site_node.agent.conftest import World


def test_generating_site_is_the_smallest_approved_site_id() -> None:
    assert generating_site(["hospital-c", "hospital-a", "hospital-b"]) == "hospital-a"


def test_three_agents_end_with_the_same_key_and_the_server_never_holds_it(world: World) -> None:
    study_id, _ = world.submit_study()
    a, b, c = (world.sites[x] for x in ("a", "b", "c"))

    # b comes first: it records the approval but has to wait for the generator (a).
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
    fingerprints = {k.key_fingerprint for k in keys.values() if k is not None}
    assert len(fingerprints) == 1
    secrets = {k.secret_context for k in keys.values() if k is not None}
    assert len(secrets) == 1
    secret = secrets.pop()
    assert {k.sender_id for k in keys.values() if k is not None} == {"hospital-a"}

    # What a sent the server: a public context without the secret key, and sealed bytes.
    [upload] = [
        body
        for method, path, body in a.transport.requests
        if method == "POST" and path == f"/api/v1/studies/{study_id}/keys"
    ]
    posted = json.loads(upload)
    public = base64.b64decode(posted["public_context"])
    with pytest.raises(ContextError):
        load_context(public, require_secret=True)
    assert posted["key_fingerprint"] in fingerprints
    assert {k["recipient_id"] for k in posted["sealed_keys"]} == {"hospital-b", "hospital-c"}
    for site in (a, b, c):
        for _, _, body in site.transport.requests:
            assert base64.b64encode(secret) not in body
            assert secret[:4096] not in body


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


def test_key_sealed_by_a_site_with_another_enrolled_key_is_refused(world: World) -> None:
    """The relay names a signing key that is not the sender's enrolment: b refuses."""
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
