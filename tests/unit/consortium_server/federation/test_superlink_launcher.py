"""Concord's SuperLink launcher and guarded ServerApp, without processes.

The launcher serves Flower's own app behind path allow-lists and relies on private Flower
1.41 names; these tests pin them so that a Flower upgrade fails here, loudly, instead of
silently reopening Control or Runtime on the public port.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from concord_protocol.bundle import APP_DIR, SERVERAPP_REF, bundle_hash
from consortium_server.federation.guarded_serverapp import (
    ServerAppBundleRefusedError,
    allowed_serverapps,
    check_serverapp_bundle,
)
from consortium_server.federation.superlink_launcher import (
    LauncherError,
    PathAllowList,
    _checked_flower_args,
    route_groups,
)

FLEET_ROUTES = {
    "activate-node",
    "deactivate-node",
    "register-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
}


@pytest.fixture(scope="module")
def flower_app() -> Any:
    from flwr.superlink.main import create_app

    return create_app()


def test_flower_names_the_launcher_relies_on_still_exist() -> None:
    import importlib

    import uvicorn
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app

    # The module (flwr.superlink.cli re-exports a function of the same name).
    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")

    assert callable(flower_superlink._parse_superlink_lifespan_config)
    assert callable(flower_superlink._parse_args_run_superlink)
    assert isinstance(flower_superlink.SuperLinkLifespan, type)
    assert callable(create_app)
    assert callable(iter_route_contexts)
    assert callable(uvicorn.Server.capture_signals)
    # Flower's gRPC switches the launcher strips from the environment.
    from flwr.common.constant import FLWR_INTERNAL_GRPC_CONTROL_API, FLWR_INTERNAL_GRPC_FLEET_API

    assert {FLWR_INTERNAL_GRPC_CONTROL_API, FLWR_INTERNAL_GRPC_FLEET_API} == {
        "FLWR_INTERNAL_GRPC_CONTROL_API",
        "FLWR_INTERNAL_GRPC_FLEET_API",
    }


def test_every_flower_route_falls_in_a_known_group(flower_app: Any) -> None:
    groups = route_groups(flower_app)
    assert {p.rsplit("/", 1)[1] for _, p in groups["fleet"]} == FLEET_ROUTES
    assert {m for m, _ in groups["fleet"]} == {"POST"}
    control = {p.rsplit("/", 1)[1] for _, p in groups["control"]}
    assert {"start-run", "list-runs", "stop-run", "register-node", "unregister-node"} <= control
    assert ("POST", "/v1/runtime/acquire-task") in groups["runtime"]
    assert groups["health"] == {("GET", "/health"), ("HEAD", "/health")}
    # Nothing new that no listener would serve, besides the documentation pages.
    assert {p for _, p in groups["other"]} == {"/docs", "/docs/oauth2-redirect", "/openapi.json"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/fleet/pull-messages", 415),  # reached Flower (no protobuf body)
        ("GET", "/health", 200),
        ("POST", "/v1/control/start-run", 404),
        ("POST", "/v1/control/list-runs", 404),
        ("POST", "/v1/control/register-node", 404),
        ("POST", "/v1/runtime/acquire-task", 404),
        ("GET", "/docs", 404),
        ("GET", "/openapi.json", 404),
        ("GET", "/v1/fleet/pull-messages", 404),
        ("POST", "/v1/fleet/pull-messages/", 404),
        ("POST", "/v1/fleet/../control/start-run", 404),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs", 404),
    ],
)
def test_the_public_listener_serves_the_fleet_api_alone(
    flower_app: Any, method: str, path: str, status: int
) -> None:
    groups = route_groups(flower_app)
    public = PathAllowList(flower_app, groups["fleet"] | groups["health"], name="fleet")
    transport = httpx.ASGITransport(app=public)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            return await client.request(method, path)

    import asyncio

    assert asyncio.run(call()).status_code == status


def test_the_launcher_refuses_what_would_reopen_the_split(tmp_path: Path) -> None:
    base = [
        "--ssl-ca-certfile",
        "ca.pem",
        "--ssl-certfile",
        "c.pem",
        "--ssl-keyfile",
        "k.pem",
    ]
    for extra, reason in (
        (["--isolation", "subprocess"], "--isolation subprocess"),
        (["--insecure"], "--insecure"),
        (["--host", "0.0.0.0"], "loopback only"),
    ):
        with pytest.raises(LauncherError) as exc:
            _checked_flower_args([*base, *extra], tmp_path)
        assert reason in str(exc.value.code)
    args, secret = _checked_flower_args(base, tmp_path)
    assert args[-4:] == ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    assert secret.stat().st_mode & 0o777 == 0o600


def _fab(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_the_guarded_serverapp_runs_concords_bundle_only() -> None:
    from flwr.cli.build import build_fab_from_disk

    concord = build_fab_from_disk(APP_DIR)
    allowed = allowed_serverapps()
    assert allowed == {bundle_hash(): SERVERAPP_REF}
    assert check_serverapp_bundle(concord, allowed) == SERVERAPP_REF
    pyproject = (APP_DIR / "pyproject.toml").read_bytes()
    foreign = _fab({"pyproject.toml": pyproject.replace(b"concord-study", b"evil"), "x.py": b""})
    with pytest.raises(ServerAppBundleRefusedError) as exc:
        check_serverapp_bundle(foreign, allowed)
    assert exc.value.code == "federation.bundle_not_allowed"


def test_an_allowed_hash_must_still_be_configuration_naming_the_allowed_serverapp() -> None:
    import hashlib

    pyproject = (APP_DIR / "pyproject.toml").read_text()
    agent = pyproject.replace(
        "[tool.flwr.app.components]\n", '[tool.flwr.app.components]\nagentapp = "evil:app"\n'
    )
    for fab in (
        _fab({"pyproject.toml": agent.encode()}),
        _fab({"pyproject.toml": pyproject.encode(), "evil.py": b"import os"}),
        b"not a zip",
    ):
        allowed = {hashlib.sha256(fab).hexdigest(): SERVERAPP_REF}
        with pytest.raises(ServerAppBundleRefusedError):
            check_serverapp_bundle(fab, allowed)


def test_flower_names_the_guarded_serverapp_replaces_still_exist() -> None:
    import importlib

    runner = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    assert callable(runner.install_from_fab)
    assert callable(runner.run_)
    assert callable(runner.run_serverapp)
    from flwr.superlink.cli.flwr_serverapp import _parse_args_run_flwr_serverapp

    args = _parse_args_run_flwr_serverapp().parse_args(["--token-file", "/t", "--insecure"])
    assert args.token_file == "/t"


def test_the_superlink_state_waits_a_minute_for_its_sqlite_lock(tmp_path: Path) -> None:
    """Flower's state waits 5 s (``PRAGMA busy_timeout``); the launcher's SuperLink waits
    60 s, read back from a connection of Flower's own object store (a fresh process, so
    this one keeps Flower's defaults)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        from sqlalchemy import text
        from flwr.supercore.object_store.sql_object_store import SqlObjectStore
        from consortium_server.federation.superlink_launcher import (
            SQLITE_BUSY_TIMEOUT_MS, lengthen_sqlite_busy_timeout,
        )

        def busy(path):
            store = SqlObjectStore(path)
            store.initialize()
            with store._engine.connect() as conn:
                return conn.execute(text("PRAGMA busy_timeout")).scalar()

        before = busy({str(tmp_path / "a.db")!r})
        lengthen_sqlite_busy_timeout()
        print(before, busy({str(tmp_path / "b.db")!r}), SQLITE_BUSY_TIMEOUT_MS)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    before, after, wanted = out.stdout.split()
    assert (before, after) == ("5000", wanted)
    assert int(wanted) == 60_000
