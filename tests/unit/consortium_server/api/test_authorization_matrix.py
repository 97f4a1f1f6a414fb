"""Every endpoint x every role x own/other object, with the status each cell must get.

"Own" objects belong to the caller (their study, their site); "other" objects belong to
someone else. Studies are invisible (404) to those who may not see them; actions on visible
objects by the wrong role are 403; no token is 401.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.testclient import TestClient

from tests.support.world import (
    People,
    build_consortium,
    dataset_body,
    signed_approval,
    site_enrolment,
    study_contract,
)

ROLES = ("anonymous", "no_role", "researcher", "data_steward", "site_node", "compliance", "admin")


class World:
    """Four hospitals a-d. Study "own" uses a,b,c (by rita); "other" uses b,c,d (by oscar).
    The caller's organisation is Hospital a for the steward, site node and role-less token."""

    def __init__(self, client: TestClient, people: People) -> None:
        self.client = client
        self.people = people
        build_consortium(client, people, sites=("a", "b", "c", "d"))
        self.counter = itertools.count()

    def headers(self, role: str) -> dict[str, str]:
        p = self.people
        return {
            "anonymous": {},
            "no_role": p.headers("nobody", [], "Hospital a"),
            "researcher": p.researcher,
            "data_steward": p.steward("a"),
            "site_node": p.node("a"),
            "compliance": p.compliance,
            "admin": p.admin,
        }[role]

    def study(self, which: str) -> dict[str, Any]:
        datasets, owner = (
            (["bc-a", "bc-b", "bc-c"], self.people.researcher)
            if which == "own"
            else (["bc-b", "bc-c", "bc-d"], self.people.other_researcher)
        )
        response = self.client.post("/api/v1/studies", json=study_contract(datasets), headers=owner)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}"


@dataclass(frozen=True)
class Endpoint:
    name: str
    call: Callable[[World, str, str], Any]  # (world, role, own|other) -> response
    expected: dict[tuple[str, str], int]


def _same_for_both(statuses: dict[str, int]) -> dict[tuple[str, str], int]:
    return {(role, obj): status for role, status in statuses.items() for obj in ("own", "other")}


MEMBERS_READ = {
    "anonymous": 401,
    "no_role": 403,
    "researcher": 200,
    "data_steward": 200,
    "site_node": 200,
    "compliance": 200,
    "admin": 200,
}


def _get(path: str) -> Callable[[World, str, str], Any]:
    return lambda w, role, obj: w.client.get(path, headers=w.headers(role))


def _site_for(obj: str) -> str:
    return "hospital-a" if obj == "own" else "hospital-b"


def _enrol(w: World, role: str, obj: str) -> Any:
    site = w.unique("hospital-new")
    return w.client.post(
        "/api/v1/sites", json=site_enrolment(site, site.upper()), headers=w.headers(role)
    )


def _revoke(w: World, role: str, obj: str) -> Any:
    site = w.unique("hospital-rev")
    assert (
        w.client.post(
            "/api/v1/sites", json=site_enrolment(site, site.upper()), headers=w.headers("admin")
        ).status_code
        == 201
    )
    return w.client.post(
        f"/api/v1/sites/{site}/revoke",
        json={"reason": "Left the consortium."},
        headers=w.headers(role),
    )


def _publish(w: World, role: str, obj: str) -> Any:
    body = dataset_body(w.unique("ds"), _site_for(obj))
    return w.client.post("/api/v1/datasets", json=body, headers=w.headers(role))


def _submit(w: World, role: str, obj: str) -> Any:
    return w.client.post(
        "/api/v1/studies", json=study_contract(["bc-a", "bc-b", "bc-c"]), headers=w.headers(role)
    )


def _read_study(w: World, role: str, obj: str) -> Any:
    study = w.study(obj)
    return w.client.get(f"/api/v1/studies/{study['id']}", headers=w.headers(role))


def _approve(w: World, role: str, obj: str) -> Any:
    study = w.study(obj)
    body = signed_approval(w.client, w.headers("admin"), study, "hospital-a")
    return w.client.post(
        f"/api/v1/studies/{study['id']}/approvals", json=body, headers=w.headers(role)
    )


def _abort(w: World, role: str, obj: str) -> Any:
    study = w.study(obj)
    return w.client.post(
        f"/api/v1/studies/{study['id']}/abort",
        json={"reason": "Stop it."},
        headers=w.headers(role),
    )


ENDPOINTS = [
    Endpoint(
        "GET /api/v1/me", _get("/api/v1/me"), _same_for_both({**MEMBERS_READ, "no_role": 200})
    ),
    Endpoint("GET /api/v1/sites", _get("/api/v1/sites"), _same_for_both(MEMBERS_READ)),
    Endpoint(
        "GET /api/v1/sites/{id}",
        lambda w, role, obj: w.client.get(
            f"/api/v1/sites/{_site_for(obj)}", headers=w.headers(role)
        ),
        _same_for_both(MEMBERS_READ),
    ),
    Endpoint(
        "POST /api/v1/sites",
        _enrol,
        _same_for_both({**{r: 403 for r in ROLES}, "anonymous": 401, "admin": 201}),
    ),
    Endpoint(
        "POST /api/v1/sites/{id}/revoke",
        _revoke,
        _same_for_both({**{r: 403 for r in ROLES}, "anonymous": 401, "admin": 200}),
    ),
    Endpoint("GET /api/v1/datasets", _get("/api/v1/datasets"), _same_for_both(MEMBERS_READ)),
    Endpoint(
        "GET /api/v1/datasets/{id}",
        lambda w, role, obj: w.client.get(
            f"/api/v1/datasets/{'bc-a' if obj == 'own' else 'bc-b'}", headers=w.headers(role)
        ),
        _same_for_both(MEMBERS_READ),
    ),
    Endpoint(
        "POST /api/v1/datasets",
        _publish,
        {
            **_same_for_both({**{r: 403 for r in ROLES}, "anonymous": 401}),
            ("data_steward", "own"): 201,
            ("site_node", "own"): 201,
        },
    ),
    Endpoint(
        "POST /api/v1/studies",
        _submit,
        _same_for_both({**{r: 403 for r in ROLES}, "anonymous": 401, "researcher": 201}),
    ),
    Endpoint(
        "GET /api/v1/studies/{id}",
        _read_study,
        {
            **_same_for_both({**MEMBERS_READ, "no_role": 403}),
            ("researcher", "other"): 404,
            ("data_steward", "other"): 404,
            ("site_node", "other"): 404,
        },
    ),
    Endpoint(
        "POST /api/v1/studies/{id}/approvals",
        _approve,
        {
            **_same_for_both({**{r: 403 for r in ROLES}, "anonymous": 401}),
            ("data_steward", "own"): 201,
            ("data_steward", "other"): 404,
            ("site_node", "own"): 201,
            ("site_node", "other"): 404,
        },
    ),
    Endpoint(
        "POST /api/v1/studies/{id}/abort",
        _abort,
        {
            **_same_for_both({**{r: 403 for r in ROLES}, "anonymous": 401, "admin": 200}),
            ("researcher", "own"): 200,
            ("researcher", "other"): 404,
        },
    ),
]


def test_every_endpoint_role_and_object(client: TestClient, people: People) -> None:
    world = World(client, people)
    cells = 0
    wrong: list[str] = []
    for endpoint in ENDPOINTS:
        for role in ROLES:
            for obj in ("own", "other"):
                expected = endpoint.expected[(role, obj)]
                response = endpoint.call(world, role, obj)
                cells += 1
                if response.status_code != expected:
                    wrong.append(
                        f"{endpoint.name} as {role} on {obj}: expected {expected}, "
                        f"got {response.status_code} {response.text[:200]}"
                    )
                elif expected >= 400:
                    assert "error" in response.json()
    assert not wrong, "\n".join(wrong)
    assert cells == len(ENDPOINTS) * len(ROLES) * 2


def test_study_lists_show_only_visible_studies(client: TestClient, people: People) -> None:
    world = World(client, people)
    own, other = world.study("own"), world.study("other")

    def ids(role: str) -> set[str]:
        response = client.get("/api/v1/studies", headers=world.headers(role))
        assert response.status_code == 200
        return {s["id"] for s in response.json()}

    assert ids("researcher") == {own["id"]}
    assert ids("data_steward") == {own["id"]}
    assert ids("site_node") == {own["id"]}
    assert ids("compliance") == {own["id"], other["id"]}
    assert ids("admin") == {own["id"], other["id"]}
    assert client.get("/api/v1/studies", headers=world.headers("no_role")).status_code == 403
