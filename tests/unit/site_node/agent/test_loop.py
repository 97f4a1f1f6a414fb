"""The agent loop: a second pass changes nothing, transient errors are retried, SIGTERM
stops the loop, and `site-node run --once` works against a live server."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from site_node.agent.heartbeat import age_s
from site_node.agent.loop import run_agent
from site_node.cli import app as cli
from site_node.settings import SiteSettings
from tests.unit.site_node.agent.conftest import World, token


def _files(state_dir: Path) -> dict[str, float]:
    return {
        str(p.relative_to(state_dir)): p.stat().st_mtime_ns
        for p in state_dir.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_second_pass_is_a_no_op(world: World) -> None:
    """Once every site caught up (the first round grows the audit log: key relayed and
    fetched, so a and b cosign again in the second), a pass changes nothing, posts
    nothing and adds no audit entry."""
    study_id, _contract_hash = world.submit_study()
    for _ in range(2):
        for site in world.sites.values():
            assert site.agent.run_pass().ok
    size = _head_size(world)
    before = {x: _files(s.state_dir) for x, s in world.sites.items()}
    for site in world.sites.values():
        site.transport.requests.clear()

    for site in world.sites.values():
        report = site.agent.run_pass()
        assert report.ok, report.steps
        assert report.sync is not None
        assert report.sync.unchanged == [study_id]
        assert report.sync.recorded == []
        assert report.sync.revoked == []
        assert report.keys is not None
        assert report.keys.unchanged == [study_id]
        assert report.witness is not None
        assert not report.witness.cosigned
        assert site.transport.posts() == []

    assert {x: _files(s.state_dir) for x, s in world.sites.items()} == before
    assert _head_size(world) == size


def _head_size(world: World) -> int:
    r = world.client.get("/api/v1/audit/heads/latest", headers=world.people.compliance)
    return int(r.json()["tree_size"])


def test_transient_api_errors_are_retried(world: World) -> None:
    _study_id, contract_hash = world.submit_study()
    site = world.sites["a"]
    site.transport.fail_next = [503, httpx.ConnectError("connection refused")]

    report = site.agent.run_pass()

    assert report.ok, report.steps
    assert [(s.name, s.attempts) for s in report.steps] == [
        ("peers", 3),
        ("sync", 1),
        ("keys", 1),
        ("witness", 1),
        ("release", 1),
    ]
    assert site.store.get(contract_hash) is not None


def test_step_that_keeps_failing_is_reported_as_a_transient_failure(world: World) -> None:
    site = world.sites["a"]
    site.transport.fail_next = [*[502] * 3, *[503] * 3, *[503] * 3]

    report = site.agent.run_pass()

    assert not report.ok
    assert report.transient_failure
    assert [(s.name, s.ok, s.code) for s in report.steps] == [
        ("peers", False, "service.unavailable"),
        ("sync", False, "service.unavailable"),
        ("witness", False, "service.unavailable"),
    ]


def _agent_env(world: World, letter: str, api_url: str) -> dict[str, str]:
    site = world.sites[letter]
    return {
        "CONCORD_SITE_SITE_ID": site.site_id,
        "CONCORD_SITE_ORGANISATION": f"Hospital {letter}",
        "CONCORD_SITE_STATE_DIR": str(site.state_dir),
        "CONCORD_SITE_API_URL": api_url,
        "CONCORD_SITE_TOKEN": token(world.people, letter),
        "CONCORD_SITE_POLL_INTERVAL_S": "0.2",
    }


def test_sigterm_stops_the_loop_cleanly(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.submit_study()
    for name, value in _agent_env(world, "b", "http://testserver").items():
        monkeypatch.setenv(name, value)
    settings = SiteSettings()
    assert age_s(settings.state_dir) is None  # no pass yet: the probes fail
    early: list[int] = []

    def too_early(signum: int, _frame: object) -> None:  # pytest must survive a slow start
        early.append(signum)

    previous = signal.signal(signal.SIGTERM, too_early)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    try:
        status = run_agent(settings, transport=world.sites["b"].transport)
        assert signal.getsignal(signal.SIGTERM) is too_early  # the agent restored it
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert status == 0
    assert early == []
    assert time.monotonic() - started < 10
    passes = [p for m, p, _ in world.sites["b"].transport.requests if p == "/api/v1/studies"]
    assert len(passes) >= 2  # it looped at the 0.2 s interval until the signal
    # Every pass left its heartbeat, which the container's probes read.
    age = age_s(settings.state_dir)
    assert age is not None
    assert age < 10


@pytest.fixture
def live_server(app: FastAPI, world: World) -> Iterator[str]:
    """The same app served by uvicorn on a free port (its lifespan already runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_site_node_run_once_against_a_live_server(world: World, live_server: str) -> None:
    study_id, contract_hash = world.submit_study()
    runner = CliRunner()
    env = _agent_env(world, "a", live_server)

    result = runner.invoke(cli, ["run", "--once"], env=env)

    assert result.exit_code == 0, result.output
    assert world.sites["a"].store.get(contract_hash) is not None
    assert world.sites["a"].store.study_key(study_id) is not None
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events[0] == "agent.start"
    assert events[-1] == "agent.pass"
    assert "agent.key_generated" in events
    assert all(line["level"] != "ERROR" for line in lines)
    for text in (result.stderr, result.stdout):
        assert env["CONCORD_SITE_TOKEN"] not in text
        assert "PRIVATE KEY" not in text


def test_run_once_exits_1_when_a_step_failed(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _agent_env(world, "b", "http://testserver").items():
        monkeypatch.setenv(name, value)
    transport = world.sites["b"].transport
    transport.fail_next = [httpx.ConnectError("no route")] * 6
    assert run_agent(SiteSettings(), once=True, transport=transport, retry_base_s=0.0) == 1
    assert run_agent(SiteSettings(), once=True, transport=transport, retry_base_s=0.0) == 0


def test_site_node_run_without_credentials_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        ["run", "--once"],
        env={"CONCORD_SITE_SITE_ID": "hospital-z", "CONCORD_SITE_STATE_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "does not exist" in result.stderr  # no keys yet
