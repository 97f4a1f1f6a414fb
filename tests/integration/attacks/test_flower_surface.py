"""Attacks on Flower's process surface, with real processes (issue 12, attacks 1 and 7).

1. **An outsider holding only the CA certificate** (every site has it) on the SuperLink's
   public port: with Flower's own clients it cannot start a run, list runs, register a
   node or reach the Runtime API (404: only the Fleet API is served there); the Control
   listener refuses its TLS handshake (no client certificate); the Runtime API listens on
   loopback only and refuses ``acquire-task`` without the SuperExec secret.
2. **A bundle naming an AgentApp** (or any other app than the installed ClientApp) starts
   nothing: not on Concord's SuperLink (its executor never acquires the AgentApp task), and
   not at a site even when a hostile SuperLink delivers the run's messages to it (the site's
   executor acquires ClientApp tasks only). Every attacker module writes a marker file when
   imported: it never appears. The same message to a SuperNode configured as Flower ships
   it (``--isolation subprocess``) does run the attacker's code: the attack is real.
3. **A local process without the secret** (another container in the pod) gets 401 from the
   SuperNode's ``acquire-task`` even while a ClientApp task is pending; the site's executor,
   which holds the secret, gets it.
4. **No task token in any process's arguments** during an honest study round (the demo's
   processes), and no SuperExec secret in any argument or environment value.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from concord_protocol.processes import ManagedProcess, flower_env, flwr_binary, spawn
from consortium_server.federation.processes import (
    SuperLinkHandle,
    TlsFiles,
    run_status,
    start_superlink,
)
from consortium_server.federation.tls import make_dev_tls
from site_node.federation.processes import SuperNodeProcess, SuperNodeSpec, start_supernode
from tests.support.drills import wait_for
from tests.support.flower import free_port, make_site, make_supernode_key
from tests.support.flower_surface import (
    TOKEN_PATTERN,
    HostileSuperLink,
    ProcessWatch,
    attacker_bundle,
    control_as,
    fab_request,
    runtime_as,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

AGENT_COMPONENTS = {
    "serverapp": "evil_server:app",
    "clientapp": "evil_client:app",
    "agentapp": "evil_agent:app",
}
SERVER_COMPONENTS = {"serverapp": "evil_server:app", "clientapp": "evil_client:app"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_dev_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[SuperLinkHandle]:
    handle = start_superlink(tmp_path_factory.mktemp("superlink"), port=free_port(), tls=tls)
    try:
        yield handle
    finally:
        handle.stop()


def _status(exc: pytest.ExceptionInfo[httpx.HTTPStatusError]) -> int:
    return exc.value.response.status_code


# --- 1. the outsider with only the CA certificate ------------------------------------------


def test_an_outsider_with_the_ca_can_neither_start_list_nor_register_on_the_public_port(
    link: SuperLinkHandle, tls: TlsFiles, tmp_path: Path
) -> None:
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, RegisterNodeRequest

    marker = tmp_path / "evil-ran"
    app = attacker_bundle(tmp_path / "app", marker=marker, components=SERVER_COMPONENTS)
    _, public_key = make_supernode_key(tmp_path / "keys", "rogue")
    from cryptography.hazmat.primitives import serialization

    pem = serialization.load_ssh_public_key(public_key.read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    outsider = control_as(link.address, tls.ca_cert)  # what `flwr` does: CA, no client cert
    try:
        for call in (
            lambda: outsider.StartRun(fab_request(app)),
            lambda: outsider.ListRuns(ListRunsRequest()),
            lambda: outsider.RegisterNode(RegisterNodeRequest(public_key=pem, name="rogue")),
            lambda: outsider.ListNodes(ListNodesRequest()),
        ):
            with pytest.raises(httpx.HTTPStatusError) as exc:
                call()
            assert _status(exc) == 404
    finally:
        outsider.close()
    # The documentation pages, which list every route, are not served either.
    for path in ("/docs", "/openapi.json"):
        response = httpx.get(
            f"https://{link.address}{path}", verify=ssl.create_default_context(cafile=tls.ca_cert)
        )
        assert response.status_code == 404
    # Nothing was registered or started: the server's own view (client certificate).
    insider = control_as(
        link.control_endpoint().address,
        tls.ca_cert,
        client_cert=tls.client_cert,
        client_key=tls.client_key,
    )
    try:
        assert not insider.ListRuns(ListRunsRequest()).run_dict
        assert not list(insider.ListNodes(ListNodesRequest()).nodes_info)
    finally:
        insider.close()
    assert not marker.exists()


def test_the_flwr_cli_with_the_ca_is_refused_on_both_ports(
    link: SuperLinkHandle, tls: TlsFiles, tmp_path: Path
) -> None:
    """The stock tool an outsider would use: ``flwr ls`` with a connection that trusts the
    CA, against the public port and against the Control port."""
    import subprocess

    from consortium_server.federation.processes import write_connection

    for address in (link.address, link.control_endpoint().address):
        home = tmp_path / address.replace(":", "-")
        write_connection(home, "outsider", address, root_certificates=tls.ca_cert)
        done = subprocess.run(
            [flwr_binary("flwr"), "ls", "outsider", "--format", "json"],
            env=flower_env(home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # flwr reports the failure in its JSON (exit status 0 in --format json).
        result = json.loads(done.stdout)
        assert result["success"] is False, result
        assert "runs" not in result


def test_the_control_listener_refuses_a_client_without_a_federation_certificate(
    link: SuperLinkHandle, tls: TlsFiles, tmp_path: Path
) -> None:
    from flwr.proto.control_pb2 import ListRunsRequest

    control = link.control_endpoint().address
    # Only the CA: the TLS handshake is refused (no response at all).
    outsider = control_as(control, tls.ca_cert)
    try:
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
            outsider.ListRuns(ListRunsRequest())
    finally:
        outsider.close()
    # A client certificate from another CA: refused the same way.
    other = make_dev_tls(tmp_path / "other-ca")
    forger = control_as(
        control, tls.ca_cert, client_cert=other.client_cert, client_key=other.client_key
    )
    try:
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
            forger.ListRuns(ListRunsRequest())
    finally:
        forger.close()
    # The consortium server's certificate: served.
    insider = control_as(
        control, tls.ca_cert, client_cert=tls.client_cert, client_key=tls.client_key
    )
    try:
        insider.ListRuns(ListRunsRequest())
    finally:
        insider.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (``/proc/net/tcp*``)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port and len(address) == width:
                found.add(address)
    return found


def test_an_outsider_cannot_reach_the_runtime_api(link: SuperLinkHandle, tls: TlsFiles) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    request = AcquireTaskRequest(supported_task_types=["flwr-serverapp", "flwr-agentapp"])
    public = runtime_as(link.address, ca_cert=tls.ca_cert)
    try:
        with pytest.raises(httpx.HTTPStatusError) as exc:
            public.AcquireTask(request)
        assert _status(exc) == 404  # not served on the public port
    finally:
        public.close()
    # The Runtime listener is bound to loopback only ...
    runtime_port = _runtime_port(link)
    assert _listening_addresses(runtime_port) == {"0100007F"}  # 127.0.0.1
    # ... and even there acquire-task needs the SuperExec secret.
    local = runtime_as(f"127.0.0.1:{runtime_port}", ca_cert=tls.ca_cert)
    try:
        with pytest.raises(httpx.HTTPStatusError) as exc:
            local.AcquireTask(request)
        assert _status(exc) == 401
    finally:
        local.close()


def _runtime_port(link: SuperLinkHandle) -> int:
    assert link.process is not None
    argv = link.process.proc.args
    assert isinstance(argv, list)
    return int(argv[argv.index("--port") + 1])


# --- 2. bundles naming other apps than the installed ones ------------------------------


def test_an_agentapp_bundle_runs_nothing_on_the_concord_superlink(
    link: SuperLinkHandle, tls: TlsFiles, tmp_path: Path
) -> None:
    """Even the consortium server (the one holder of a Control certificate, an adversary in
    the threat model) cannot make the SuperLink run an AgentApp or a foreign ServerApp."""
    insider = control_as(
        link.control_endpoint().address,
        tls.ca_cert,
        client_cert=tls.client_cert,
        client_key=tls.client_key,
    )
    agent_marker, server_marker = tmp_path / "agent-ran", tmp_path / "server-ran"
    agent_app = attacker_bundle(
        tmp_path / "agent", marker=agent_marker, components=AGENT_COMPONENTS
    )
    server_app = attacker_bundle(
        tmp_path / "server", marker=server_marker, components=SERVER_COMPONENTS
    )
    try:
        agent_run = int(insider.StartRun(fab_request(agent_app, user_prompt="hello")).run_id)
        server_run = int(insider.StartRun(fab_request(server_app)).run_id)
    finally:
        insider.close()

    def server_run_over() -> str | None:
        status = run_status(link, server_run)
        return status if status and status.startswith("finished") else None

    # The foreign ServerApp: acquired by Concord's executor, refused before install.
    assert wait_for("the foreign ServerApp run to end", server_run_over, timeout=120) == (
        "finished:failed"
    )
    time.sleep(3)  # several executor polls
    # The AgentApp: never acquired, never started.
    assert run_status(link, agent_run) == "pending"
    assert not agent_marker.exists()
    assert not server_marker.exists()
    apps = link.flwr_home / "apps"
    assert not apps.exists() or not [p for p in apps.iterdir() if "innocent" in p.name]
    assert link.process is not None
    assert "not allowed on this SuperLink" in link.process.log_tail(500_000)


@pytest.fixture
def hostile(tmp_path: Path, tls: TlsFiles) -> Iterator[HostileSuperLink]:
    superlink = HostileSuperLink.start(tmp_path / "hostile", tls, port=free_port())
    try:
        yield superlink
    finally:
        superlink.stop()


def _concord_site(tmp_path: Path, hostile: HostileSuperLink, tls: TlsFiles) -> SuperNodeProcess:
    site = make_site(tmp_path / "site", 0)
    private, public = make_supernode_key(site.state_dir / "keys")
    hostile.register_node(public)
    return start_supernode(
        SuperNodeSpec(
            site_id=site.site_id,
            state_dir=site.state_dir,
            datasets_file=site.datasets_file,
            superlink_address=hostile.address,
            root_certificates=tls.ca_cert,
            auth_private_key=private,
            runtime_port=free_port(),
            warm_runner=False,
        )
    )


def _node_ids(grid: Any) -> list[int]:
    def joined() -> list[int]:
        return list(grid.get_node_ids())

    ids: list[int] = wait_for("the SuperNode to join", joined, timeout=60)
    return ids


def _send(grid: Any, node: int, *, timeout: float = 60.0, agent: bool = False) -> list[Any]:
    """Send one train message to ``node``; the replies *from that node* (an AgentApp run's
    inbox also holds the user's prompt). ``agent``: the content an AgentApp reads (its
    prompt text), so that a stock AgentApp goes on to load the bundle."""
    from flwr.app import ConfigRecord, Message, RecordDict

    content = (
        RecordDict({"agent": ConfigRecord({"text": "hi"})})
        if agent
        else RecordDict({"config": ConfigRecord({"round": 1})})
    )
    message = Message(content, node, "train", ttl=120.0)
    replies = grid.send_and_receive([message], timeout=timeout)
    return [reply for reply in replies if reply.metadata.src_node_id == node]


def test_a_hostile_superlink_cannot_make_a_site_run_an_agentapp(
    hostile: HostileSuperLink, tls: TlsFiles, tmp_path: Path
) -> None:
    marker = tmp_path / "agent-ran"
    app = attacker_bundle(tmp_path / "agent", marker=marker, components=AGENT_COMPONENTS)
    node = _concord_site(tmp_path, hostile, tls)
    try:
        run_id = hostile.start_run(app, user_prompt="hello")
        grid = hostile.play_task(run_id, "flwr-agentapp")
        (node_id,) = _node_ids(grid)
        replies = _send(grid, node_id, timeout=20, agent=True)
        assert wait_for(
            "the site to receive the AgentApp run's message",
            lambda: "Receiving: train message" in node.log_tail(200_000),
            timeout=60,
        )
        time.sleep(5)  # several executor polls
        assert replies == []  # no app ran to answer
        assert not marker.exists()
        state_dir = tmp_path / "site" / "hospital-a"
        apps = state_dir / "supernode" / "flwr-home" / "apps"
        assert not apps.exists() or not list(apps.iterdir())  # nothing installed
        assert node.executor is not None
        assert "started" not in node.executor.log_tail(200_000)
        assert node.alive()
    finally:
        node.stop()


def test_a_hostile_superlinks_foreign_clientapp_is_refused_before_import(
    hostile: HostileSuperLink, tls: TlsFiles, tmp_path: Path
) -> None:
    marker = tmp_path / "client-ran"
    app = attacker_bundle(tmp_path / "server", marker=marker, components=SERVER_COMPONENTS)
    node = _concord_site(tmp_path, hostile, tls)
    try:
        run_id = hostile.start_run(app)
        grid = hostile.play_task(run_id, "flwr-serverapp")
        (node_id,) = _node_ids(grid)
        (reply,) = _send(grid, node_id, timeout=120)
        assert reply.has_error()
        assert "not allowed at this site" in reply.error.reason
        assert not marker.exists()
        assert node.executor is not None
        assert "started" in node.executor.log_tail(200_000)  # the guarded ClientApp ran
    finally:
        node.stop()


def test_the_agentapp_attack_runs_code_at_a_site_configured_as_flower_ships(
    hostile: HostileSuperLink, tls: TlsFiles, tmp_path: Path
) -> None:
    """The control experiment: a SuperNode with Flower's defaults (``--isolation
    subprocess``, the stock SuperExec and ``flwr-agentapp``) imports the attacker's code."""
    marker = tmp_path / "agent-ran"
    app = attacker_bundle(tmp_path / "agent", marker=marker, components=AGENT_COMPONENTS)
    private, public = make_supernode_key(tmp_path / "keys")
    hostile.register_node(public)
    port = free_port()
    stock: ManagedProcess = spawn(
        "stock-supernode",
        [
            flwr_binary("flower-supernode"),
            "--superlink",
            hostile.address,
            "--root-certificates",
            str(tls.ca_cert),
            "--auth-supernode-private-key",
            str(private),
            "--port",
            str(port),
        ],
        env=flower_env(tmp_path / "stock-home"),
        log_path=tmp_path / "stock.log",
    )
    try:
        run_id = hostile.start_run(app, user_prompt="hello")
        grid = hostile.play_task(run_id, "flwr-agentapp")
        (node_id,) = _node_ids(grid)
        _send(grid, node_id, timeout=5, agent=True)
        wait_for("the attacker's module to be imported", marker.exists, timeout=120)
    finally:
        stock.stop()


# --- 3. the SuperNode's local Runtime API ----------------------------------------------------


def test_a_local_process_without_the_secret_cannot_take_a_clientapp_task(
    hostile: HostileSuperLink, tls: TlsFiles, tmp_path: Path
) -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest

    app = attacker_bundle(tmp_path / "server", marker=tmp_path / "m", components=SERVER_COMPONENTS)
    node = _concord_site(tmp_path, hostile, tls)
    try:
        assert node.executor is not None
        node.executor.stop()  # so that a ClientApp task stays pending
        run_id = hostile.start_run(app)
        grid = hostile.play_task(run_id, "flwr-serverapp")
        (node_id,) = _node_ids(grid)
        _send(grid, node_id, timeout=1)
        wait_for(
            "the site to queue the ClientApp task",
            lambda: "Receiving: train message" in node.log_tail(200_000),
            timeout=60,
        )
        runtime_address = f"127.0.0.1:{_supernode_runtime_port(node)}"
        request = AcquireTaskRequest(supported_task_types=["flwr-clientapp"])
        for secret in (None, b"a guess"):
            intruder = runtime_as(runtime_address, ca_cert=None, secret=secret)
            try:
                with pytest.raises(httpx.HTTPStatusError) as exc:
                    intruder.AcquireTask(request)
                assert _status(exc) == 401
                # Every other route needs a task token, which only acquire-task hands out.
                with pytest.raises(httpx.HTTPStatusError) as exc:
                    intruder.PullTaskInput(PullTaskInputRequest())
                assert _status(exc) in (401, 403)
            finally:
                intruder.close()
        # The site's executor holds the secret: the task was pending all along.
        secret_file = tmp_path / "site" / "hospital-a" / "supernode" / "superexec.secret"
        executor = runtime_as(runtime_address, ca_cert=None, secret=secret_file.read_bytes())
        try:
            res = executor.AcquireTask(request)
        finally:
            executor.close()
        assert res.HasField("task")
        assert res.task.type == "flwr-clientapp"
    finally:
        node.stop()


def _supernode_runtime_port(node: SuperNodeProcess) -> int:
    argv = node.proc.args
    assert isinstance(argv, list)
    return int(argv[argv.index("--port") + 1])


# --- 4. no token in any process's arguments during a round ---------------------------------


def test_no_task_token_or_secret_is_in_any_process_arguments_during_a_round(
    tmp_path: Path,
) -> None:
    from rich.console import Console

    from concord_demo.story import DemoOptions, run_demo

    watch = ProcessWatch(os.getpid())
    with watch.running():
        result = run_demo(
            DemoOptions(state_dir=tmp_path / "demo", rounds=1),
            Console(file=open(os.devnull, "w"), width=120),  # noqa: SIM115
            Path(sys.executable).parent,
        )
    assert result.state == "completed"
    clientapps = [a for a in watch.commands("flwr-clientapp") if "--token-file" in a]
    serverapps = watch.commands("guarded_serverapp")
    assert len(clientapps) >= 3, sorted(watch.argv.values())  # train at three sites at least
    assert serverapps
    assert all("--token-file" in a for a in serverapps)
    for argv in watch.argv.values():
        assert "--token" not in argv, argv
        assert not any(TOKEN_PATTERN.search(a) for a in argv), argv
    secrets = [p.read_bytes().decode() for p in (tmp_path / "demo").rglob("superexec.secret")]
    assert len(secrets) == 4  # the SuperLink's and three sites'
    for values in (*watch.argv.values(), *watch.environ.values()):
        assert not any(secret in value for secret in secrets for value in values)
