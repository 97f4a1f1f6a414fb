"""/api/v1/audit over HTTP: heads, entries with proofs, consistency, export, cosignatures."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from concord_protocol.audit.cosignatures import Cosignature
from concord_protocol.audit.export import AuditExport
from concord_protocol.audit.heads import verify_tree_head
from concord_protocol.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from concord_protocol.audit.verify import verify_export
from concord_protocol.principals import Principal, Role
from consortium_server.api.errors import install_error_handlers
from consortium_server.audit.log import AuditLog
from consortium_server.audit.router import TreeHeadPublic, router
from consortium_server.audit.signer import TreeHeadSigner
from consortium_server.errors import AuthenticationError
from consortium_server.sites.models import Site

from .conftest import SiteWitness

PRINCIPALS = {
    "officer": Principal("officer", frozenset({Role.COMPLIANCE_OFFICER}), None, "test"),
    "researcher": Principal("res", frozenset({Role.RESEARCHER}), "uni", "test"),
    "site-a": Principal("svc-a", frozenset({Role.SITE_NODE}), "Hospital A", "test"),
    "site-b": Principal("svc-b", frozenset({Role.SITE_NODE}), "Hospital B", "test"),
}


class _Verifier:
    def verify(self, token: str) -> Principal:
        if token not in PRINCIPALS:
            raise AuthenticationError()
        return PRINCIPALS[token]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(
    session_factory: sessionmaker[Session], audit_log: AuditLog, signer: TreeHeadSigner
) -> Iterator[TestClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.sessionmaker = session_factory
    app.state.verifier = _Verifier()
    app.state.audit_log = audit_log
    app.state.tree_head_signer = signer
    with TestClient(app) as test_client:
        yield test_client


def test_entries_heads_and_consistency_over_http(
    client: TestClient,
    signer: TreeHeadSigner,
    append_entries: Callable[[int], list[int]],
) -> None:
    append_entries(3)
    first = client.get("/api/v1/audit/heads/latest", headers=_auth("researcher"))
    assert first.status_code == 200, first.text
    head3 = TreeHeadPublic.model_validate(first.json())
    verify_tree_head(head3.signed_head(), signer.public_key)
    assert (head3.tree_size, head3.witnessed, head3.cosignatures) == (3, False, [])

    append_entries(4)
    response = client.get("/api/v1/audit/entries/5", headers=_auth("officer"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tree_size"] == 7
    assert body["head"]["tree_size"] == 7
    leaf = leaf_hash(base64.b64decode(body["entry_b64"]))
    assert leaf.hex() == body["leaf_hash"]
    assert body["entry"]["actor"]["subject"] == "alice"
    verify_inclusion(
        leaf,
        5,
        7,
        [bytes.fromhex(p) for p in body["inclusion_proof"]],
        bytes.fromhex(body["root_hash"]),
    )
    older = client.get("/api/v1/audit/entries/1?tree_size=3", headers=_auth("officer")).json()
    assert older["root_hash"] == head3.root_hash
    assert older["head"]["tree_size"] == 3

    proof = client.get("/api/v1/audit/consistency?first=3", headers=_auth("researcher")).json()
    assert proof["second"] == 7
    verify_consistency(
        3,
        7,
        bytes.fromhex(head3.root_hash),
        bytes.fromhex(body["root_hash"]),
        [bytes.fromhex(p) for p in proof["proof"]],
    )

    assert client.get("/api/v1/audit/entries/1", headers=_auth("researcher")).status_code == 403
    missing = client.get("/api/v1/audit/entries/99", headers=_auth("officer"))
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "audit.entry_not_found")
    bad = client.get("/api/v1/audit/consistency?first=5&second=4", headers=_auth("officer"))
    assert bad.json()["error"]["code"] == "audit.invalid_range"
    assert client.get("/api/v1/audit/heads/latest").status_code == 401

    export = client.get("/api/v1/audit/export", headers=_auth("officer"))
    assert export.status_code == 200
    report = verify_export(
        AuditExport.model_validate(export.json()), trusted_server_key=signer.public_key_b64
    )
    assert report.ok
    assert report.entries == 7
    assert client.get("/api/v1/audit/export", headers=_auth("site-a")).status_code == 403


def _add_site(session: Session, site_id: str, organisation: str, witness: SiteWitness) -> None:
    """An enrolled site whose signing key is ``witness``'s (the rest does not matter here)."""
    session.add(
        Site(
            id=site_id,
            organisation=organisation,
            display_name=organisation,
            contact_email="it@example.org",
            signing_public_key=witness.public_key_b64,
            exchange_public_key="x",
            supernode_public_key="x",
            enrolled_by="admin",
        )
    )
    session.commit()


def test_sites_cosign_heads_for_their_own_organisation(
    client: TestClient,
    session: Session,
    make_site: Callable[[str], SiteWitness],
    append_entries: Callable[[int], list[int]],
) -> None:
    sites = {"site-a": make_site("site-a"), "site-b": make_site("site-b")}
    for site_id, org in (("site-a", "Hospital A"), ("site-b", "Hospital B")):
        _add_site(session, site_id, org, sites[site_id])
    append_entries(2)
    head = TreeHeadPublic.model_validate(
        client.get("/api/v1/audit/heads/latest", headers=_auth("site-a")).json()
    ).signed_head()

    def post(token: str, site_id: str) -> tuple[int, dict[str, object]]:
        cosig = sites[site_id].witness().cosign(head, [])
        body = cosig.model_dump(mode="json", exclude={"tree_size"})
        response = client.post(
            f"/api/v1/audit/heads/{head.tree_size}/cosignatures", json=body, headers=_auth(token)
        )
        return response.status_code, response.json()

    assert post("site-a", "site-b")[0] == 403  # another organisation's site
    assert post("officer", "site-a")[0] == 403  # not a site node
    assert post("site-a", "site-a")[0] == 201
    status, created = post("site-b", "site-b")
    assert status == 201
    assert created["site_id"] == "site-b"
    latest = client.get("/api/v1/audit/heads/latest", headers=_auth("officer")).json()
    assert latest["witnessed"] is True
    assert [c["site_id"] for c in latest["cosignatures"]] == ["site-a", "site-b"]


@pytest.mark.parametrize(
    "timestamp",
    ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "not a time"],
    ids=["before-year-1-in-utc", "after-9999-in-utc", "garbage"],
)
def test_a_cosignature_time_utc_cannot_hold_is_a_422(
    client: TestClient,
    session: Session,
    make_site: Callable[[str], SiteWitness],
    append_entries: Callable[[int], list[int]],
    timestamp: str,
) -> None:
    witness = make_site("site-a")
    _add_site(session, "site-a", "Hospital A", witness)
    append_entries(1)
    head = TreeHeadPublic.model_validate(
        client.get("/api/v1/audit/heads/latest", headers=_auth("site-a")).json()
    ).signed_head()
    body = witness.witness().cosign(head, []).model_dump(mode="json", exclude={"tree_size"})
    body["timestamp"] = timestamp
    response = client.post(
        f"/api/v1/audit/heads/{head.tree_size}/cosignatures", json=body, headers=_auth("site-a")
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "request.invalid"


def test_the_server_refuses_cosignatures_not_bound_to_its_log_and_heads(
    client: TestClient,
    session: Session,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
    append_entries: Callable[[int], list[int]],
) -> None:
    site = make_site("site-a")
    _add_site(session, "site-a", "Hospital A", site)
    append_entries(3)
    head = TreeHeadPublic.model_validate(
        client.get("/api/v1/audit/heads/latest", headers=_auth("site-a")).json()
    ).signed_head()
    good = site.witness().cosign(head, [])

    def post(cosig: Cosignature) -> tuple[int, str]:
        body = cosig.model_dump(mode="json", exclude={"tree_size"})
        response = client.post(
            f"/api/v1/audit/heads/{head.tree_size}/cosignatures", json=body, headers=_auth("site-a")
        )
        return response.status_code, response.json().get("error", {}).get("code", "")

    def resign(**changes: Any) -> Cosignature:
        changed = good.model_copy(update=changes)
        signature = base64.b64encode(site.key.sign(changed.message())).decode("ascii")
        return changed.model_copy(update={"signature": signature})

    assert post(resign(log_id="another.log")) == (422, "audit.cosignature_wrong_log")
    assert post(resign(timestamp=datetime(1970, 1, 1, tzinfo=UTC))) == (
        422,
        "audit.cosignature_time_invalid",
    )
    assert post(resign(timestamp=datetime.now(UTC) + timedelta(hours=1))) == (
        422,
        "audit.cosignature_time_invalid",
    )
    assert post(resign(key_id="ab" * 32)) == (404, "audit.head_not_found")
    assert post(resign(head_timestamp=head.timestamp - timedelta(seconds=1))) == (
        404,
        "audit.head_not_found",
    )
    assert post(good.model_copy(update={"signature": resign(log_id="x").signature}))[0] == 422
    assert post(good)[0] == 201


def test_the_export_comes_in_pages_that_join_into_the_whole_log(
    client: TestClient,
    session: Session,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
    audit_log: AuditLog,
) -> None:
    from concord_protocol.audit.export import join_pages
    from consortium_server.audit.export import build_export

    from .conftest import build_witnessed_log

    sites = [make_site("site-a"), make_site("site-b")]
    build_witnessed_log(session, audit_log, signer, sites, (5, 10, 11, 23))
    pages = []
    start: int | None = 0
    while start is not None:
        response = client.get(
            "/api/v1/audit/export", params={"start": start, "limit": 10}, headers=_auth("officer")
        )
        assert response.status_code == 200, response.text
        page = AuditExport.model_validate(response.json())
        assert [e.index for e in page.entries] == list(range(start, min(start + 10, 23)))
        pages.append(page)
        start = page.next_start
    assert [p.next_start for p in pages] == [10, 20, None]
    assert [[h.tree_size for h in p.heads] for p in pages] == [[5, 10], [11], [23]]
    joined = join_pages(pages)
    whole = build_export(session, server_public_key=signer.public_key_b64, witness_quorum=2)
    session.rollback()  # end the read: SQLite transactions here take the write lock
    assert joined.model_dump(exclude={"exported_at", "sites"}) == whole.model_dump(
        exclude={"exported_at", "sites"}
    )
    keys = {s.site_id: s.public_key_b64 for s in sites}
    report = verify_export(
        joined, trusted_server_key=signer.public_key_b64, trusted_site_keys=keys, quorum=2
    )
    assert report.ok, report.problems
    with pytest.raises(ValueError, match="follow on"):
        join_pages([pages[0], pages[2]])

    too_many = client.get("/api/v1/audit/export?limit=10001", headers=_auth("officer"))
    assert (too_many.status_code, too_many.json()["error"]["code"]) == (422, "request.invalid")
    beyond = client.get("/api/v1/audit/export?start=500", headers=_auth("officer")).json()
    assert (beyond["entries"], beyond["next_start"]) == ([], None)


def test_join_pages_refuses_a_missing_last_page_and_pages_of_another_log(
    session: Session,
    signer: TreeHeadSigner,
    make_site: Callable[[str], SiteWitness],
    audit_log: AuditLog,
) -> None:
    from concord_protocol.audit.export import join_pages
    from consortium_server.audit.export import build_export

    from .conftest import build_witnessed_log

    build_witnessed_log(session, audit_log, signer, [make_site("site-a")], (5, 15))
    key = signer.public_key_b64
    first, second = (
        build_export(session, server_public_key=key, start=s, limit=10) for s in (0, 10)
    )
    assert join_pages([first, second]).next_start is None
    with pytest.raises(ValueError, match="incomplete"):
        join_pages([first])
    other = second.model_copy(update={"log_id": "another.log"})
    with pytest.raises(ValueError, match="same log"):
        join_pages([first, other])


def test_the_client_refuses_export_pages_that_never_end() -> None:
    import httpx

    from concord_protocol.client import ConsortiumClient

    served: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        served.append(int(request.url.params["start"]))
        page = AuditExport(server_public_key="k", entries=[], heads=[], cosignatures=[])
        return httpx.Response(
            200, content=page.model_copy(update={"next_start": 0}).model_dump_json()
        )

    transport = httpx.MockTransport(handler)
    with (
        ConsortiumClient("http://t", "x", transport=transport) as client,
        pytest.raises(ValueError, match="do not advance"),
    ):
        client.audit_export()
    assert served == [0]
