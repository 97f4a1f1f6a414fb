"""Schemathesis over the whole OpenAPI description, with a token per role: no 5xx.

Every operation the server documents is fuzzed from its own schema (path, query and body
values of every shape the schema allows, and the negative cases schemathesis derives), and
each generated request is sent as every identity the consortium has: the admin, a
researcher, the compliance officer, a data steward, a site node, a token the issuer never
signed, and no token at all. A server error on any of them fails the run. The consortium
behind the API is populated first (three hospitals, datasets, a submitted study), so ids
exist for the fuzzer to stumble on. Bounded: ``MAX_EXAMPLES`` cases per operation.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error

from consortium_server.federation.run_messages import CHECKPOINT_MEDIA_TYPE
from consortium_server.main import create_app
from consortium_server.settings import ServerSettings
from tests.support.world import People, build_consortium, study_contract

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

MAX_EXAMPLES = 40


@schemathesis.serializer(CHECKPOINT_MEDIA_TYPE)
def _blobs(_ctx: Any, value: Any) -> bytes:
    """Round checkpoints travel as opaque bytes (the schema says ``format: binary``)."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


@dataclass
class Served:
    app: FastAPI
    identities: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("schemathesis")
    app = create_app(
        ServerSettings(
            data_dir=root / "server",
            database={"url": f"sqlite:///{root / 'concord.db'}"},  # type: ignore[arg-type]
            policy={"member_organisations": ["University of Leiden"]},  # type: ignore[arg-type]
        )
    )
    with TestClient(app) as client:
        people = People(
            mint=lambda **claims: str(app.state.local_issuer.mint(audience="concord-api", **claims))
        )
        build_consortium(client, people)
        submitted = client.post(
            "/api/v1/studies",
            json=study_contract(["bc-a", "bc-b", "bc-c"]),
            headers=people.researcher,
        )
        assert submitted.status_code == 201, submitted.text
        # The ServerApp's federation token, as a server with a SuperLink holds one, so the
        # internal routes are fuzzed behind their authentication too.
        app.state.serverapp_token = SecretStr("fuzz-federation-token-" + "0" * 32)
        yield Served(
            app,
            {
                "admin": people.admin,
                "researcher": people.researcher,
                "compliance": people.compliance,
                "steward": people.steward("a"),
                "site-node": people.node("a"),
                "serverapp": {"Authorization": "Bearer fuzz-federation-token-" + "0" * 32},
                "forged": {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."},
                "anonymous": {},
            },
        )


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", served.app)


def _operations() -> list[tuple[str, str]]:
    """Every documented (method, path), read from an app that is never started."""
    with tempfile.TemporaryDirectory() as directory:
        described = create_app(ServerSettings(data_dir=Path(directory))).openapi()
    return [(m.upper(), p) for p, operations in described["paths"].items() for m in operations]


@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda v: str(v))
def test_no_operation_answers_any_identity_with_a_server_error(
    method: str, path: str, api_schema: Any, served: Served
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case: Any) -> None:
        for headers in served.identities.values():
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

    fuzz()


def test_the_description_documents_the_bearer_scheme_and_the_error_shape(
    served: Served,
) -> None:
    described = served.app.openapi()
    assert described["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in described["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert responses["422"]["content"]["application/json"]["schema"] == error
            assert responses["500"]["content"]["application/json"]["schema"] == error
            if path in {"/healthz", "/readyz"}:
                assert "security" not in operation
            else:
                assert operation["security"] == [{"bearer": []}], (method, path)
                assert {"401", "403"} <= responses.keys(), (method, path)
