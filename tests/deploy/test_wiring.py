"""The charts run what the code reads: the rendered containers' command, args and env are
started as local processes, with a local directory standing in for each volume.

- server: the audit-key init container, `consortium db current` (fails before, passes
  after), the migration Job (`consortium db upgrade`) and `consortium server` until the
  readiness probe's path answers, on PostgreSQL (CONCORD_TEST_POSTGRES_URL). The API's
  rendered env builds ServerSettings that name the mounted federation token and SuperLink
  CA; the SuperLink pod's rendered env builds the ServerApp's settings (ServerAppSettings)
  on the same token, which the started server accepts on its internal API.
- SuperLink and SuperNode: the SuperLink container's rendered command (Concord's launcher:
  Fleet, Control and the loopback Runtime API on separate listeners) started with
  certificates made here; the API's rendered settings (address, CA, client certificate)
  register the site's SuperNode key through the Control listener, which refuses a
  connection without the client certificate and is not served on the Fleet port; the
  SuperNode authenticates with keys from `site-node keys init`.
- site agent: every CONCORD_SITE_* name is a SiteSettings field and the settings built
  from the rendered env find the keys, state, datasets and the site's own Cedar policy
  (sitePolicy) where the chart puts them.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.charts import load_values, merge, render
from tests.deploy.cluster import (
    BIN,
    REPO_ROOT,
    Pod,
    ed25519_pem,
    environ,
    free_port,
    make_tls,
    settings_fields,
    stop,
    tls_handshake,
    wait_for_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# --- helpers ---------------------------------------------------------------------------


def tls_values(tls: dict[str, str]) -> dict[str, Any]:
    """Chart values carrying ``tls`` inline: the SuperLink's and the API's client certificate."""
    return {
        "superlink": {
            "tls": {
                "certificate": tls["tls.crt"],
                "privateKey": tls["tls.key"],
                "caCertificate": tls["ca.crt"],
            }
        },
        "federation": {
            "controlClientTls": {"certificate": tls["client.crt"], "privateKey": tls["client.key"]}
        },
    }


# --- the consortium server ---------------------------------------------------------------


@pytest.mark.parametrize("values_file", ["server-minimal.yaml", "server-production.yaml"])
def test_server_commands_start_and_become_ready(
    values_file: str, postgres_url: str, tmp_path: Path
) -> None:
    from consortium_server.federation.federation_token import load_token
    from consortium_server.federation.serverapp_settings import ServerAppSettings
    from consortium_server.settings import Environment, ServerSettings

    head_key = ed25519_pem()
    tls = make_tls(tmp_path)
    values = load_values(values_file)
    external: dict[str, dict[str, str]] = {}
    if values["database"].get("existingSecret"):
        # Production-like: the Secrets the operator creates, with the key names it chose.
        external[values["database"]["existingSecret"]] = {
            values["database"]["existingSecretKey"]: postgres_url
        }
        external[values["audit"]["existingSecret"]] = {"audit-head-key.pem": head_key}
        external[values["superlink"]["tls"]["existingSecret"]] = {
            k: tls[k] for k in ("tls.crt", "tls.key", "ca.crt")
        }
        external[values["federation"]["controlClientTls"]["existingSecret"]] = {
            "tls.crt": tls["client.crt"],
            "tls.key": tls["client.key"],
        }
        external[values["federation"]["existingSecret"]] = {
            values["federation"]["existingSecretKey"]: "operator-made-" + uuid.uuid4().hex
        }
    else:
        values = merge(
            merge(values, tls_values(tls)),
            {"database": {"url": postgres_url}, "audit": {"headKey": head_key}},
        )
    if values.get("policies", {}).get("consortium"):
        # The override is mounted and read at start-up: it must be a valid policy set, so
        # mount the shipped one through the override path (an invalid one stops the server).
        shipped = REPO_ROOT / "policies"
        values = merge(
            values,
            {
                "policies": {
                    "schema": (shipped / "schema.cedarschema").read_text(),
                    "consortium": {
                        f.name: f.read_text()
                        for f in sorted((shipped / "consortium").glob("*.cedar"))
                    },
                }
            },
        )
    rendered = render("server", values)
    pod = Pod(rendered, "Deployment", "consortium-server", tmp_path / "api", external)

    # Every CONCORD_* name the chart sets is one ServerSettings reads (unknown names are
    # silently ignored by pydantic-settings, so this is the only guard against typos).
    known = settings_fields(ServerSettings, "CONCORD_")
    for name in ("install-audit-key", "wait-for-migrations", "api"):
        names = {n for n in pod.env(pod.container(name)) if n.startswith("CONCORD_")}
        assert names <= known, f"{name}: {sorted(names - known)} are not ServerSettings fields"

    # The API's settings, as `consortium server` builds them from the rendered env: the
    # federation token and the SuperLink's CA are the files the chart mounts.
    api_env = {
        k: v for k, v in pod.process_env(pod.container("api")).items() if k.startswith("CONCORD_")
    }
    with environ(api_env):
        settings = ServerSettings()
    assert settings.environment is Environment.PRODUCTION
    token_file = settings.federation.serverapp_token_file
    assert token_file is not None
    assert settings.serverapp_token_file() == token_file
    assert token_file.is_relative_to(tmp_path / "api" / "etc")  # on a mount, not the data dir
    assert token_file.stat().st_mode & 0o777 == 0o440
    api_token = load_token(token_file)  # the server's own check: not readable by others
    # The Control API through its own (ClusterIP) Service, with the mounted client certificate.
    link_service = rendered.get("Service", "superlink-control")
    assert settings.federation.superlink_address == (
        f"{link_service['metadata']['name']}.concord.svc:{link_service['spec']['ports'][0]['port']}"
    )
    assert settings.federation.root_certificates is not None
    assert settings.federation.root_certificates.read_text() == tls["ca.crt"]
    federation = settings.federation
    assert federation.client_certificate is not None
    assert federation.client_private_key is not None
    assert federation.client_certificate.read_text() == tls["client.crt"]
    assert federation.client_private_key.read_text() == tls["client.key"]
    assert tls["tls.key"] not in {
        p.read_text() for p in (tmp_path / "api").rglob("*") if p.is_file()
    }  # the SuperLink's key is nowhere in the API pod

    # The ServerApp's settings, as the SuperLink's pod passes its env on to it: the same
    # token, and the API Service's in-cluster URL.
    link = Pod(rendered, "Deployment", "superlink", tmp_path / "link", external)
    link_env = {
        k: v
        for k, v in link.process_env(link.container("superlink")).items()
        if k.startswith("CONCORD_SERVERAPP_")
    }
    assert set(link_env) <= settings_fields(ServerAppSettings, "CONCORD_SERVERAPP_")
    with environ(link_env):
        app_settings = ServerAppSettings()
    assert app_settings.token_file.stat().st_mode & 0o777 == 0o440
    assert app_settings.token().get_secret_value() == api_token.get_secret_value()
    api_service = rendered.get("Service", "consortium-server")
    assert app_settings.api_url == (
        f"http://{api_service['metadata']['name']}.concord.svc:"
        f"{api_service['spec']['ports'][0]['port']}"
    )
    assert app_settings.heartbeat_s < settings.federation.run_liveness_s

    # The key lands in the data dir with mode 0600 (the Secret volume's 0440 is refused).
    result = pod.run("install-audit-key")
    assert result.returncode == 0, result.stderr
    data_dir = Path(pod.local(pod.env(pod.container("api"))["CONCORD_DATA_DIR"]))
    key_file = data_dir / "audit-head-key.pem"
    assert key_file.read_text() == head_key
    assert key_file.stat().st_mode & 0o777 == 0o600

    # The API pods wait: `consortium db current` fails until the Job has migrated.
    before = pod.run("wait-for-migrations")
    assert before.returncode == 1, before.stdout + before.stderr
    job = Pod(rendered, "Job", "-migrate", tmp_path / "job", external)
    migrated = job.run("migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "database at revision" in migrated.stdout
    after = pod.run("wait-for-migrations")
    assert after.returncode == 0, after.stdout + after.stderr

    api = pod.container("api")
    port = free_port()
    assert pod.env(api)["CONCORD_API__PORT"] == str(api["ports"][0]["containerPort"])
    process = pod.start("api", tmp_path / "api.log", CONCORD_API__PORT=str(port))
    try:
        wait_for_port(port, process)
        readiness = api["readinessProbe"]["httpGet"]["path"]
        liveness = api["livenessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 30
        while True:
            response = httpx.get(f"http://127.0.0.1:{port}{readiness}", timeout=5)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200, response.text
        assert response.json()["database"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}{liveness}", timeout=5).status_code == 200
        # The internal API takes the token the SuperLink's pod mounts, and nothing else.
        heartbeat = (
            f"http://127.0.0.1:{port}/internal/v1/federation/studies/no-such-study/runs/"
            f"{uuid.uuid4().hex}/heartbeat"
        )
        for token, status in ((app_settings.token().get_secret_value(), 404), ("x" * 48, 401)):
            answer = httpx.post(heartbeat, headers={"Authorization": f"Bearer {token}"}, timeout=5)
            assert answer.status_code == status, answer.text
    finally:
        stop(process)
    # It loaded the operator's key and the mounted token: it made neither of its own (only
    # the `flwr` connection to the SuperLink is written to the data dir).
    assert key_file.read_text() == head_key
    assert sorted(p.name for p in data_dir.iterdir()) == ["audit-head-key.pem", "flwr-home"]


# --- Flower: SuperLink and SuperNode -----------------------------------------------------


@pytest.fixture
def site_keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys-from-init"
    result = subprocess.run(
        [str(BIN / "site-node"), "keys", "init", "--dir", str(keys)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return keys


def _launcher_argv(argv: list[str], replace: dict[str, str]) -> list[str]:
    """``argv`` with the value after each flag in ``replace`` replaced (each found once)."""
    out, found = [], []
    for index, arg in enumerate(argv):
        flag = argv[index - 1] if index else ""
        if flag in replace:
            found.append(flag)
            arg = replace[flag]
        out.append(arg)
    assert sorted(found) == sorted(replace), found
    return out


def test_superlink_and_supernode_start_with_the_rendered_args(
    tmp_path: Path, site_keys: Path
) -> None:
    from concord_protocol.processes import FlowerProcessError
    from consortium_server.federation import control_client
    from consortium_server.federation.control_client import ControlEndpoint
    from consortium_server.federation.processes import register_supernode
    from consortium_server.federation.runs import connect_superlink
    from consortium_server.settings import ServerSettings

    tls = make_tls(tmp_path)
    rendered = render("server", merge(load_values("server-minimal.yaml"), tls_values(tls)))
    link = Pod(rendered, "Deployment", "superlink", tmp_path / "link")
    container = link.container("superlink")
    assert container["command"] == [
        "tini",
        "-g",
        "--",
        "python",
        "-m",
        "consortium_server.federation.superlink_launcher",
    ]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    # The rendered listeners: Fleet and Control on every interface (the Services pick the
    # ports), the Runtime API on loopback, the health server for the probes.
    assert args[args.index("--fleet-address") + 1] == f"0.0.0.0:{ports['fleet']}"
    assert args[args.index("--control-address") + 1] == f"0.0.0.0:{ports['control']}"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--health-server-address") + 1] == f"0.0.0.0:{ports['health']}"
    fleet, control, runtime, health = free_port(), free_port(), free_port(), free_port()
    argv = _launcher_argv(
        link.argv(container),
        {
            "--fleet-address": f"127.0.0.1:{fleet}",
            "--control-address": f"127.0.0.1:{control}",
            "--port": str(runtime),
            "--health-server-address": f"127.0.0.1:{health}",
        },
    )
    log = tmp_path / "superlink.log"
    superlink = link.start("superlink", log, args=argv)
    supernode: subprocess.Popen[bytes] | None = None
    try:
        for port in (fleet, control, runtime, health):
            wait_for_port(port, superlink)
        state = Path(link.local(args[args.index("--database") + 1]))
        assert state.exists(), "the SuperLink keeps no state on its volume"
        # The launcher made the SuperExec secret where the rendered args say, private.
        secret = Path(link.local(args[args.index("--superexec-auth-secret-file") + 1]))
        assert secret.stat().st_mode & 0o777 == 0o600
        assert secret.parent.stat().st_mode & 0o777 == 0o700
        started = log.read_text()
        assert "control listener" in started
        assert "client certificate required" in started

        # The API, with the settings its pod is rendered with (the Control Service's
        # address pointed at this machine), registers the site's SuperNode key.
        api = Pod(rendered, "Deployment", "consortium-server", tmp_path / "api")
        api_env = {
            k: v
            for k, v in api.process_env(api.container("api")).items()
            if k.startswith("CONCORD_")
        }
        api_env["CONCORD_FEDERATION__SUPERLINK_ADDRESS"] = f"127.0.0.1:{control}"
        with environ(api_env):
            settings = ServerSettings()
        handle = connect_superlink(settings)
        assert handle is not None
        assert handle.control is not None
        assert handle.control.client_cert is not None
        registered = register_supernode(handle, site_keys / "supernode.pub", name="hospital-a")
        assert registered["success"] is True

        # Without the client certificate (what every site holds: the CA) Control refuses
        # the connection; the Fleet port does not serve Control at all.
        ca_only = ControlEndpoint(address=f"127.0.0.1:{control}", ca_cert=handle.control.ca_cert)
        with pytest.raises(FlowerProcessError, match="cannot reach"):
            control_client.register_node(
                ca_only, (site_keys / "supernode.pub").read_bytes(), name="outsider"
            )
        # ...in the TLS handshake, before any HTTP: the listener's alert says why.
        # ...in the TLS handshake, before any HTTP; the API's certificate passes it.
        ca, cert, key = (
            handle.control.ca_cert,
            handle.control.client_cert,
            handle.control.client_key,
        )
        assert ca is not None
        assert tls_handshake(control, ca) != ""
        assert tls_handshake(control, ca, cert, key) == ""
        assert tls_handshake(fleet, ca) == ""  # the Fleet listener: server TLS only
        on_fleet = ControlEndpoint(
            address=f"127.0.0.1:{fleet}",
            ca_cert=handle.control.ca_cert,
            client_cert=handle.control.client_cert,
            client_key=handle.control.client_key,
        )
        with pytest.raises(FlowerProcessError, match="answered 404"):
            control_client.register_node(
                on_fleet, (site_keys / "supernode.pub").read_bytes(), name="outsider"
            )
        assert superlink.poll() is None, log.read_text()

        site_values = merge(
            load_values("site-minimal.yaml"),
            {
                "consortium": {
                    "superlinkAddress": f"127.0.0.1:{fleet}",
                    "caCertificate": tls["ca.crt"],
                }
            },
        )
        keys_secret = {
            name: (site_keys / name).read_text()
            for name in ("signing_key.pem", "exchange_key.pem", "supernode")
        }
        node = Pod(
            render("site", site_values),
            "Deployment",
            "",
            tmp_path / "site",
            {"hospital-a-site-keys": keys_secret},
        )
        installed = node.run("install-site-keys")
        assert installed.returncode == 0, installed.stderr
        node_container = node.container("supernode")
        node_health = free_port()
        node_argv = [
            f"127.0.0.1:{node_health}" if a.startswith("0.0.0.0:") else a
            for a in node.argv(node_container)
        ]
        runtime_port = free_port()
        supernode = node.start(
            "supernode", tmp_path / "supernode.log", args=[*node_argv, "--port", str(runtime_port)]
        )
        deadline = time.monotonic() + 60
        node_log = tmp_path / "supernode.log"
        while "SuperNode ID" not in node_log.read_text() and time.monotonic() < deadline:
            assert supernode.poll() is None, node_log.read_text()
            time.sleep(0.5)
        assert "SuperNode ID" in node_log.read_text(), node_log.read_text()
        assert supernode.poll() is None, node_log.read_text()
    finally:
        if supernode is not None:
            stop(supernode)
        stop(superlink)


# --- the site agent ----------------------------------------------------------------------


def test_site_agent_env_names_are_site_settings(tmp_path: Path, site_keys: Path) -> None:
    from site_node.crypto.sealing import SiteKeyPair
    from site_node.data.registry import DatasetConfig
    from site_node.settings import SiteSettings

    values = load_values("site-production.yaml")
    rendered = render("site", values)
    keys_secret = {
        name: (site_keys / name).read_text()
        for name in ("signing_key.pem", "exchange_key.pem", "supernode")
    }
    data = tmp_path / "hospital-data"
    data.mkdir()
    pod = Pod(
        rendered,
        "Deployment",
        "",
        tmp_path / "site",
        {
            "hospital-b-site-keys": keys_secret,
            "hospital-b-oidc": {"secret": "client-secret-from-keycloak"},
            "consortium-ca": {"ca.crt": make_tls(tmp_path)["ca.crt"]},
        },
        data_dirs={"hospital-data": data},
    )
    known = settings_fields(SiteSettings, "CONCORD_SITE_")
    for name in ("agent", "supernode"):
        env = pod.env(pod.container(name))
        names = {n for n in env if n.startswith("CONCORD_SITE_")}
        assert names, name
        assert names <= known, f"{name}: {sorted(names - known)} are not SiteSettings fields"

    assert pod.run("install-site-keys").returncode == 0
    env = {k: pod.local(v) for k, v in pod.env(pod.container("agent")).items()}
    with environ({k: v for k, v in env.items() if k.startswith("CONCORD_SITE_")}):
        settings = SiteSettings()
    assert settings.site_id == "hospital-b"
    assert settings.organisation == "Hospital B"
    assert settings.client_id == "site-hospital-b"
    assert settings.client_secret is not None
    assert settings.client_secret.get_secret_value() == "client-secret-from-keycloak"
    # The keys the init container copied are where the site looks, with modes it accepts.
    loaded = SiteKeyPair.load(settings.keys_dir())
    assert loaded.signing_public_b64 == SiteKeyPair.load(site_keys).signing_public_b64
    # The datasets file parses as the site's dataset configurations, paths on the data mount.
    assert settings.datasets_file is not None
    entries = yaml.safe_load(settings.datasets_file.read_text())
    configs = [DatasetConfig.model_validate(e) for e in entries]
    assert [c.id for c in configs] == ["bc-tabular", "chest-ct"]
    mount = values["data"]["mountPath"]
    assert all(str(c.path).startswith(mount + "/") for c in configs)
    assert settings.state_dir.is_dir()
    # The site's own policy is the sitePolicy the chart mounted, and it is what the site
    # evaluates (not the shipped default): the production values cap epsilon at 2.0.
    from site_node.site_policy import site_engine

    assert settings.policy_dir is not None
    assert settings.policy_dir.is_relative_to(tmp_path / "site")
    engine = site_engine(settings.policy_dir, site_id=settings.site_id)
    assert engine.texts == values["sitePolicy"]
    assert "site.epsilon-cap" in "\n".join(engine.texts.values())
    assert engine.label == "site:hospital-b"


def test_site_without_site_policy_uses_the_shipped_default(tmp_path: Path, site_keys: Path) -> None:
    from site_node.settings import SiteSettings
    from site_node.site_policy import site_engine

    rendered = render("site", load_values("site-minimal.yaml"))
    pod = Pod(
        rendered,
        "Deployment",
        "",
        tmp_path / "site",
        {"hospital-a-site-keys": {"signing_key.pem": "", "exchange_key.pem": "", "supernode": ""}},
    )
    env = {k: pod.local(v) for k, v in pod.env(pod.container("agent")).items()}
    with environ({k: v for k, v in env.items() if k.startswith("CONCORD_SITE_")}):
        settings = SiteSettings()
    assert settings.policy_dir is None
    shipped = REPO_ROOT / "policies" / "site-default"
    engine = site_engine(settings.policy_dir, site_id=settings.site_id)
    assert engine.texts == {f.name: f.read_text() for f in sorted(shipped.glob("*.cedar"))}


def test_site_agent_command_exists() -> None:
    """`site-node run` is the agent's command in the chart."""
    from site_node.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    assert "run" in names
    result = subprocess.run(
        [str(BIN / "site-node"), "run", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
