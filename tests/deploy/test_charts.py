"""The Helm charts render, lint clean, validate against Kubernetes' schemas, and refuse
bad values with Helm's schema error. Real Helm (v4 as a library), no cluster."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.deploy.charts import (
    CHART_OF,
    INVALID_VALUES,
    VALID_VALUES,
    Rendered,
    load_values,
    merge,
    pod_specs,
    render,
)

KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
#: The SuperLink container's command: Concord's launcher, as processes.py runs it locally.
#: The images' init (PID 1), which every long-running container's command starts with.
TINI = ["tini", "-g", "--"]
LAUNCHER_COMMAND = [*TINI, "python", "-m", "consortium_server.federation.superlink_launcher"]
VALID = [(chart, name) for chart, names in VALID_VALUES.items() for name in names]
INVALID = [(chart, name) for chart, names in INVALID_VALUES.items() for name in names]


@pytest.fixture(scope="module", params=VALID, ids=[name for _, name in VALID])
def rendered(request: pytest.FixtureRequest) -> tuple[str, str, Rendered]:
    chart, name = request.param
    return chart, name, render(chart, load_values(name))


@pytest.fixture(scope="module")
def server_min() -> Rendered:
    return render("server", load_values("server-minimal.yaml"))


@pytest.fixture(scope="module")
def server_prod() -> Rendered:
    return render("server", load_values("server-production.yaml"))


@pytest.fixture(scope="module")
def site_min() -> Rendered:
    return render("site", load_values("site-minimal.yaml"))


@pytest.fixture(scope="module")
def site_prod() -> Rendered:
    return render("site", load_values("site-production.yaml"))


# --- every rendering -------------------------------------------------------------------


def test_every_manifest_is_valid_kubernetes(rendered: tuple[str, str, Rendered]) -> None:
    _, _, result = rendered
    docs = result.docs()
    assert docs
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc}")


def test_strict_validation_catches_a_misspelt_field(server_min: Rendered) -> None:
    """The validator is really strict: the same Deployment with one misspelt field fails."""
    deployment = json.loads(json.dumps(server_min.get("Deployment", "consortium-server")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_lint_strict_is_clean(rendered: tuple[str, str, Rendered]) -> None:
    chart, name, _ = rendered
    report = helm_python.lint(str(CHART_OF[chart]), load_values(name), strict=True)
    assert report["messages"] == [], report
    assert report["errors"] == [], report


def test_recommended_labels_on_every_object(rendered: tuple[str, str, Rendered]) -> None:
    _chart, _, result = rendered
    for doc in result.docs():
        labels = doc["metadata"].get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/version",
            "helm.sh/chart",
        ):
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_every_container_is_hardened_and_bounded(rendered: tuple[str, str, Rendered]) -> None:
    _, _, result = rendered
    specs = pod_specs(result)
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec.get("automountServiceAccountToken") is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert set(container["resources"]) == {"requests", "limits"}, where
            image = container["image"]
            assert ":latest" not in image, where
            assert "@sha256:" in image or image.rsplit(":", 1)[1][0].isdigit(), where


def test_flower_processes_get_the_flower_environment(rendered: tuple[str, str, Rendered]) -> None:
    _, _, result = rendered
    flower = [
        c
        for _, spec in pod_specs(result)
        for c in spec["containers"]
        if c["command"][:3] == TINI
        and (c["command"][3:5] == ["site-node", "supernode"] or c["command"] == LAUNCHER_COMMAND)
    ]
    assert len(flower) == 1
    env = {e["name"]: e.get("value") for e in flower[0]["env"]}
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_notes_tell_the_next_step(rendered: tuple[str, str, Rendered]) -> None:
    chart, _, result = rendered
    assert "Next step" in result.notes
    expected = "consortium --api-url" if chart == "server" else "site-node keys enrolment"
    assert expected in result.notes


# --- invalid values ----------------------------------------------------------------------


@pytest.mark.parametrize(("chart", "name"), INVALID, ids=[name for _, name in INVALID])
def test_invalid_values_fail_with_the_schema_error(chart: str, name: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(chart, load_values(name))
    message = str(caught.value)
    assert "values don't meet the specifications of the schema" in message
    offending = {
        "server-invalid-typo.yaml": "'replicas' not allowed",
        "server-invalid-type.yaml": "/superlink/port",
        "server-invalid-missing.yaml": "/database",
        "site-invalid-typo.yaml": "'organization' not allowed",
        "site-invalid-type.yaml": "/datasets",
        "site-invalid-missing.yaml": "siteKeys",
    }[name]
    assert offending in message, message


@pytest.mark.parametrize(
    ("chart", "base", "override", "where"),
    [
        ("server", "server-minimal.yaml", {"image": {"tag": "latest"}}, "/image/tag"),
        ("server", "server-minimal.yaml", {"ingress": {"enabled": True}}, "/ingress"),
        ("site", "site-minimal.yaml", {"data": {"hostPath": "/srv/x"}}, "/data"),
        ("site", "site-minimal.yaml", {"networkPolicy": {"consortiumCidrs": []}}, "/networkPolicy"),
        (
            "site",
            "site-minimal.yaml",
            {"datasets": [{"id": "x", "kind": "excel"}]},
            "/datasets/0/kind",
        ),
        (
            "server",
            "server-production.yaml",
            {"ingress": {"paths": ["/api", "/internal/v1/federation"]}},
            "/ingress/paths/1",
        ),
        ("server", "server-production.yaml", {"ingress": {"paths": ["/"]}}, "/ingress/paths/0"),
        ("server", "server-minimal.yaml", {"federation": {"token": "short"}}, "/federation/token"),
        (
            "server",
            "server-minimal.yaml",
            {"federation": {"controlClientTls": {"certificate": "", "privateKey": ""}}},
            "/federation/controlClientTls",
        ),
        (
            "server",
            "server-minimal.yaml",
            {"superlink": {"controlPort": "9093"}},
            "/superlink/controlPort",
        ),
        (
            "server",
            "server-minimal.yaml",
            {"federation": {"runLivenessSeconds": "30"}},
            "/federation/runLivenessSeconds",
        ),
    ],
    ids=[
        "latest-tag",
        "ingress-without-host",
        "two-data-sources",
        "no-egress-cidr",
        "bad-dataset",
        "ingress-publishes-internal",
        "ingress-publishes-everything",
        "short-federation-token",
        "no-control-client-certificate",
        "control-port-as-string",
        "liveness-as-string",
    ],
)
def test_schema_refuses_unsafe_combinations(
    chart: str, base: str, override: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(chart, merge(load_values(base), override))
    assert where in str(caught.value)


#: Schema objects that must accept unknown keys: `global` holds a parent chart's globals.
OPEN_OBJECTS = {"$defs/global"}


def test_schemas_forbid_unknown_keys_everywhere() -> None:
    """Every object in both schemas that lists properties forbids others (but `global`)."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            open_object = path.split("/", 1)[-1] in OPEN_OBJECTS
            if "properties" in node and node.get("type") == "object" and not open_object:
                assert node.get("additionalProperties") is False, path
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}")

    for chart in CHART_OF.values():
        walk(json.loads((chart / "values.schema.json").read_text()), chart.name)


FREE_FORM = {
    "resources",
    "sitePolicy",
    "nodeConfig",
    "podAnnotations",
    "podLabels",
    "podSelector",
    "parameters",
    "nodeSelector",
    "annotations",
    "affinity",
    "policies.consortium",
}


def _value_paths(node: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict) and key not in FREE_FORM and path not in FREE_FORM:
            paths.extend(_value_paths(value, f"{path}."))
    return paths


def test_every_value_is_commented_starting_with_its_name() -> None:
    for chart in CHART_OF.values():
        text = (chart / "values.yaml").read_text()
        comments = {
            line.strip()[2:].split(" ", 1)[0]
            for line in text.splitlines()
            if line.strip().startswith("# ")
        }
        paths = _value_paths(yaml.safe_load(text))
        assert len(paths) > 40
        missing = [path for path in paths if path not in comments]
        assert missing == [], f"{chart.name}/values.yaml: no comment for {missing}"


# --- what the server chart renders -------------------------------------------------------


def test_server_runs_the_projects_commands(server_min: Rendered) -> None:
    api = server_min.get("Deployment", "consortium-server")["spec"]["template"]["spec"]
    assert api["containers"][0]["command"] == ["tini", "-g", "--", "consortium", "server"]
    assert [c["command"][:3] for c in api["initContainers"]] == [
        ["install", "-m", "0600"],
        ["consortium", "db", "current"],
    ]
    job = server_min.get("Job", "-migrate")["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["consortium", "db", "upgrade"]
    superlink = server_min.get("Deployment", "superlink")["spec"]["template"]["spec"]
    container = superlink["containers"][0]
    assert container["command"] == LAUNCHER_COMMAND
    ours, flower = _launcher_args(container["args"])
    assert ours == {
        "--fleet-address": "0.0.0.0:9092",
        "--control-address": "0.0.0.0:9093",
        "--work-dir": "/run/concord-superlink/launcher",
    }
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
        "--superexec-auth-secret-file",
    ):
        assert flag in flower
    assert "--insecure" not in flower
    # The Runtime (ServerAppIo) API on loopback, in the pod only; Flower starts no SuperExec.
    assert flower[flower.index("--host") + 1] == "127.0.0.1"
    assert flower[flower.index("--port") + 1] == "9091"
    assert flower[flower.index("--isolation") + 1] == "process"
    secret = flower[flower.index("--superexec-auth-secret-file") + 1]
    assert secret == "/run/concord-superlink/launcher/superexec.secret"
    assert flower[flower.index("--database") + 1].startswith("/var/lib/flower/")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in superlink["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/var/lib/flower"]]
    # The launcher's directory (deny stubs, the SuperExec secret): in memory, in this pod only.
    assert volumes[mounts["/run/concord-superlink"]]["emptyDir"]["medium"] == "Memory"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"fleet": 9092, "control": 9093, "health": 9095}


def _launcher_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """The launcher's own options (before ``--``) and Flower's arguments (after it)."""
    split = args.index("--")
    ours = args[:split]
    assert len(ours) % 2 == 0, ours
    return dict(zip(ours[::2], ours[1::2], strict=True)), args[split + 1 :]


def _flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def test_superlink_runs_what_processes_py_runs_locally(
    server_min: Rendered, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's SuperLink command is the one ``start_superlink`` builds for the demo and
    the tests: the same launcher options and Flower flags in the same order, the same files
    (TLS, state, the SuperExec secret in the launcher's directory); the chart adds only the
    gRPC health server its probes use."""
    from consortium_server.federation import processes

    captured: list[list[str]] = []

    class CapturedError(Exception):
        pass

    def spawn(name: str, args: list[str], **_: Any) -> None:
        captured.append(list(args))
        raise CapturedError

    monkeypatch.setattr(processes, "spawn", spawn)
    tls = processes.TlsFiles(
        ca_cert=tmp_path / "ca.pem",
        server_cert=tmp_path / "server.pem",
        server_key=tmp_path / "server.key",
    )
    with pytest.raises(CapturedError):
        processes.start_superlink(tmp_path / "link", port=9092, tls=tls)
    local = captured[0]
    assert local[1:3] == LAUNCHER_COMMAND[len(TINI) + 1 :]  # sys.executable -m <launcher>
    local_ours, local_flower = _launcher_args(local[3:])

    container = server_min.get("Deployment", "superlink")["spec"]["template"]["spec"]["containers"][
        0
    ]
    ours, flower = _launcher_args(container["args"])
    assert list(ours) == list(local_ours)
    assert _flags(flower) == [*_flags(local_flower), "--health-server-address"]
    # Same files: the TLS files by role, the SuperExec secret inside the launcher's --work-dir.
    for flag, local_name, chart_name in (
        ("--ssl-ca-certfile", "ca.pem", "ca.crt"),
        ("--ssl-certfile", "server.pem", "tls.crt"),
        ("--ssl-keyfile", "server.key", "tls.key"),
    ):
        assert local_flower[local_flower.index(flag) + 1].endswith(local_name)
        assert flower[flower.index(flag) + 1] == f"/etc/concord/superlink-tls/{chart_name}"
    for args, work_dir in ((local_flower, local_ours["--work-dir"]), (flower, ours["--work-dir"])):
        secret = args[args.index("--superexec-auth-secret-file") + 1]
        assert secret == f"{work_dir}/superexec.secret"
        assert args[args.index("--isolation") + 1] == "process"
        assert args[args.index("--host") + 1] == "127.0.0.1"


def test_superlink_publishes_only_the_fleet_api(
    server_min: Rendered, server_prod: Rendered
) -> None:
    api_pods = {
        "app.kubernetes.io/name": "consortium-server",
        "app.kubernetes.io/instance": "concord",
        "app.kubernetes.io/component": "api",
    }
    for rendered in (server_min, server_prod):
        public = rendered.get("Service", "superlink")["spec"]
        assert [(p["port"], p["targetPort"]) for p in public["ports"]] == [(9092, "fleet")]
        control = rendered.get("Service", "superlink-control")
        assert control["metadata"]["name"] == "concord-consortium-server-superlink-control"
        assert control["spec"]["type"] == "ClusterIP"
        assert [(p["port"], p["targetPort"]) for p in control["spec"]["ports"]] == [
            (9093, "control")
        ]
        assert control["spec"]["selector"] == public["selector"]
        assert "annotations" not in control["metadata"]
        link = rendered.get("NetworkPolicy", "superlink")["spec"]
        rules = {p["port"]: rule for rule in link["ingress"] for p in rule["ports"]}
        assert set(rules) == {9092, 9093, 9095}  # no rule for the Runtime API (loopback)
        assert rules[9093] == {
            "from": [{"podSelector": {"matchLabels": api_pods}}],
            "ports": [{"port": 9093, "protocol": "TCP"}],
        }
        # The API pods dial the Control port; nothing of theirs needs the Fleet port.
        assert all("podSelector" not in peer for peer in rules[9092].get("from", []))
        api = rendered.get("NetworkPolicy", "consortium-server")["spec"]
        to_link = [r for r in api["egress"] if "podSelector" in (r.get("to") or [{}])[0]]
        assert [p["port"] for r in to_link for p in r["ports"]] == [9093]


def test_superlink_ports_must_differ() -> None:
    values = merge(load_values("server-minimal.yaml"), {"superlink": {"controlPort": 9092}})
    with pytest.raises(helm_python.HelmRenderError, match="four different ports"):
        render("server", values)


def test_api_pods_hold_a_client_certificate_of_their_own(
    server_min: Rendered, server_prod: Rendered
) -> None:
    for rendered, secret_name in (
        (server_min, "concord-consortium-server-control-client-tls"),
        (server_prod, "concord-control-client-tls"),
    ):
        api = _pod(rendered, "consortium-server")
        container = api["spec"]["containers"][0]
        env = _container_env(rendered, container)
        cert = env["CONCORD_FEDERATION__CLIENT_CERTIFICATE"]
        key = env["CONCORD_FEDERATION__CLIENT_PRIVATE_KEY"]
        assert _mounted_file(api, container, cert) == (secret_name, "tls.crt", 0o440)
        assert _mounted_file(api, container, key) == (secret_name, "tls.key", 0o440)
        settings = rendered.get("ConfigMap", "-settings")["data"]
        assert (settings["CONCORD_FEDERATION__CLIENT_CERTIFICATE"], key) == (cert, key)
        # The API pods never mount the SuperLink's key; the SuperLink's pod never mounts
        # the client certificate's Secret at all.
        for volume in api["spec"]["volumes"]:
            secret = volume.get("secret", {})
            if secret.get("secretName") == _tls_secret(rendered):
                assert [i["key"] for i in secret["items"]] == ["ca.crt"], volume
        link = _pod(rendered, "superlink")
        assert secret_name not in [
            v.get("secret", {}).get("secretName") for v in link["spec"]["volumes"]
        ]
    # The chart's own Secret rolls the API pods when it changes.
    annotations = _pod(server_min, "consortium-server")["metadata"]["annotations"]
    assert annotations["checksum/control-client-tls"] == _checksum(
        server_min, "secret-control-client-tls.yaml"
    )
    secret = server_min.get("Secret", "control-client-tls")
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["stringData"]) == {"tls.crt", "tls.key"}


def _tls_secret(rendered: Rendered) -> str:
    link = _pod(rendered, "superlink")
    return next(v for v in link["spec"]["volumes"] if v["name"] == "tls")["secret"]["secretName"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"federation": {"controlClientTls": {"existingSecret": "concord-superlink-tls"}}},
            "must not be superlink.tls.existingSecret",
        ),
        (None, "must not be the SuperLink's private key"),
    ],
    ids=["same-secret", "same-key"],
)
def test_the_client_key_is_never_the_superlinks(
    override: dict[str, Any] | None, message: str
) -> None:
    if override is None:
        base = load_values("server-minimal.yaml")
        key = base["superlink"]["tls"]["privateKey"]
        override = {"federation": {"controlClientTls": {"privateKey": key}}}
        values = merge(base, override)
    else:
        values = merge(load_values("server-production.yaml"), override)
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render("server", values)


def test_server_probes_hit_the_health_endpoints(server_min: Rendered) -> None:
    api = server_min.get("Deployment", "consortium-server")["spec"]["template"]["spec"]
    container = api["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = container["readinessProbe"]["httpGet"]["port"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port] == 8600


def test_server_production_uses_existing_secrets(server_prod: Rendered) -> None:
    assert server_prod.all("Secret") == []
    api = server_prod.get("Deployment", "consortium-server")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in api["containers"][0]["env"]}
    ref = env["CONCORD_DATABASE__URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "concord-database", "key": "url"}
    volumes = {v["name"]: v for v in api["volumes"]}
    assert volumes["audit-key"]["secret"]["secretName"] == "concord-audit-key"
    superlink = server_prod.get("Deployment", "superlink")["spec"]["template"]["spec"]
    tls = {v["name"]: v for v in superlink["volumes"]}["tls"]
    assert tls["secret"]["secretName"] == "concord-superlink-tls"
    client = volumes["control-client-tls"]["secret"]
    assert client["secretName"] == "concord-control-client-tls"
    assert api["containers"][0]["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert server_prod.get("Ingress")["spec"]["tls"][0]["hosts"] == ["concord.example.org"]
    paths = [p["path"] for p in server_prod.get("Ingress")["spec"]["rules"][0]["http"]["paths"]]
    assert not {"/", "/healthz", "/readyz", "/metrics"} & set(paths)
    assert not [p for p in paths if p.startswith("/internal")]  # the ServerApp's routes
    service = server_prod.get("Service", "superlink")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["loadBalancerSourceRanges"] == ["198.51.100.0/24", "203.0.113.7/32"]
    assert server_prod.get("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    policies = server_prod.get("ConfigMap", "-policies")["data"]
    assert set(policies) == {"schema.cedarschema", "consortium.privacy.cedar"}


def test_server_minimal_creates_its_secrets(server_min: Rendered) -> None:
    names = sorted(s["metadata"]["name"] for s in server_min.all("Secret"))
    assert names == [
        "concord-consortium-server-audit-key",
        "concord-consortium-server-control-client-tls",
        "concord-consortium-server-database",
        "concord-consortium-server-federation-token",
        "concord-consortium-server-migrate",  # the migration hook's copy of database.url
        "concord-consortium-server-superlink-tls",
    ]
    audit = server_min.get("Secret", "audit-key")
    assert audit["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_server_network_policies(server_prod: Rendered) -> None:
    api = server_prod.get("NetworkPolicy", "consortium-server")["spec"]
    assert api["policyTypes"] == ["Ingress", "Egress"]
    assert [p["port"] for p in api["ingress"][0]["ports"]] == [8600]
    egress_ports = {p["port"] for rule in api["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 9093, 5432, 443, 8443}  # the SuperLink's Control port
    link = server_prod.get("NetworkPolicy", "superlink")["spec"]
    cidrs = [f["ipBlock"]["cidr"] for f in link["ingress"][0]["from"] if "ipBlock" in f]
    assert cidrs == ["198.51.100.0/24", "203.0.113.7/32"]


# --- the ServerApp reports rounds to the API with the federation token -------------------

TOKEN_SECRET = "concord-consortium-server-federation-token"
API_SERVICE_URL = "http://concord-consortium-server.concord.svc:80"
SUPERLINK_ADDRESS = "concord-consortium-server-superlink-control.concord.svc:9093"
REMOVED_SETTINGS = ("REPLICA_ID", "RUNS_DIR", "RUN_TIMEOUT_S", "LEASE_TTL_S")


def _pod(rendered: Rendered, suffix: str) -> dict[str, Any]:
    return rendered.get("Deployment", suffix)["spec"]["template"]


def _container_env(rendered: Rendered, container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: its ConfigMaps' data, then its env (values or refs)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        config = next(c for c in rendered.all("ConfigMap") if c["metadata"]["name"] == name)
        env.update(config["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def _mounted_file(
    template: dict[str, Any], container: dict[str, Any], path: str
) -> tuple[str, str, int]:
    """(Secret name, Secret key, defaultMode) behind the file ``path`` in ``container``."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/"):
            assert mount["readOnly"] is True, mount
            secret = volumes[mount["name"]]["secret"]
            name = path[len(mount["mountPath"]) + 1 :]
            item = next(i for i in secret["items"] if i["path"] == name)
            return secret["secretName"], item["key"], secret["defaultMode"]
    raise AssertionError(f"{path} is not on a mounted volume")


def _checksum(rendered: Rendered, template: str) -> str:
    text = rendered.templates[f"consortium-server/templates/{template}"]
    return hashlib.sha256(text.encode()).hexdigest()


def test_chart_generates_the_federation_token(server_min: Rendered) -> None:
    secret = server_min.get("Secret", "federation-token")
    token = secret["stringData"]["token"]
    assert len(token) >= 32
    assert token.isalnum()
    assert "helm.sh/resource-policy" not in secret["metadata"].get("annotations", {})
    # Nothing to look up without a cluster: every render draws a new token...
    again = render("server", load_values("server-minimal.yaml"))
    assert again.get("Secret", "federation-token")["stringData"]["token"] != token
    # ...but within one render the Secret and both pods' checksums agree on it.
    for suffix in ("consortium-server", "superlink"):
        annotations = _pod(server_min, suffix)["metadata"]["annotations"]
        assert annotations["checksum/federation-token"] == _checksum(
            server_min, "secret-federation-token.yaml"
        ), suffix
        assert annotations["checksum/superlink-tls"] == _checksum(
            server_min, "secret-superlink-tls.yaml"
        ), suffix


def test_federation_token_from_values_rolls_the_pods_when_changed() -> None:
    base = load_values("server-minimal.yaml")
    first, second = "a" * 16 + "-first-token-value-x", "b" * 16 + "-second-token-value-y"
    one = render("server", merge(base, {"federation": {"token": first}}))
    assert one.get("Secret", "federation-token")["stringData"] == {"token": first}
    same = render("server", merge(base, {"federation": {"token": first}}))
    other = render("server", merge(base, {"federation": {"token": second}}))
    for suffix in ("consortium-server", "superlink"):
        checksum = [
            _pod(r, suffix)["metadata"]["annotations"]["checksum/federation-token"]
            for r in (one, same, other)
        ]
        assert checksum[0] == checksum[1] != checksum[2], suffix


def test_existing_federation_secret_is_mounted_and_none_rendered(server_prod: Rendered) -> None:
    assert [s["metadata"]["name"] for s in server_prod.all("Secret")] == []
    api = _pod(server_prod, "consortium-server")
    api_container = api["spec"]["containers"][0]
    api_env = _container_env(server_prod, api_container)
    token_file = api_env["CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE"]
    assert _mounted_file(api, api_container, token_file) == (
        "concord-federation",
        "serverapp-token",
        0o440,
    )
    link = _pod(server_prod, "superlink")
    link_container = link["spec"]["containers"][0]
    link_token = _container_env(server_prod, link_container)["CONCORD_SERVERAPP_TOKEN_FILE"]
    assert _mounted_file(link, link_container, link_token) == (
        "concord-federation",
        "serverapp-token",
        0o440,
    )


def test_api_pods_reach_the_superlink_and_read_the_token(server_min: Rendered) -> None:
    api = _pod(server_min, "consortium-server")
    container = api["spec"]["containers"][0]
    env = _container_env(server_min, container)
    assert env["CONCORD_FEDERATION__SUPERLINK_ADDRESS"] == SUPERLINK_ADDRESS
    link_service = server_min.get("Service", "superlink-control")  # Control, not Fleet
    host, port = SUPERLINK_ADDRESS.split(":")
    assert host.split(".")[0] == link_service["metadata"]["name"]
    assert int(port) in [p["port"] for p in link_service["spec"]["ports"]]
    # The SuperLink's CA, and only the CA, from its TLS Secret.
    ca = env["CONCORD_FEDERATION__ROOT_CERTIFICATES"]
    assert _mounted_file(api, container, ca) == (
        "concord-consortium-server-superlink-tls",
        "ca.crt",
        0o440,
    )
    volumes = {v["name"]: v for v in api["spec"]["volumes"]}
    tls_volumes = [
        v["secret"]
        for v in volumes.values()
        if v.get("secret", {}).get("secretName") == "concord-consortium-server-superlink-tls"
    ]
    assert [[i["key"] for i in v["items"]] for v in tls_volumes] == [["ca.crt"]]
    token_file = env["CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE"]
    assert _mounted_file(api, container, token_file) == (TOKEN_SECRET, "token", 0o440)
    # Non-secret settings in the ConfigMap, the defaults of the settings object.
    settings = server_min.get("ConfigMap", "-settings")["data"]
    assert settings["CONCORD_FEDERATION__SUPERLINK_ADDRESS"] == SUPERLINK_ADDRESS
    assert settings["CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE"] == token_file
    assert settings["CONCORD_FEDERATION__RUN_LIVENESS_S"] == "30"
    assert settings["CONCORD_FEDERATION__MAX_RESTARTS"] == "3"
    assert settings["CONCORD_FEDERATION__REGISTER_SUPERNODES"] == "true"
    assert settings["CONCORD_FEDERATION__RESUME_ON_START"] == "true"


def test_superlink_pod_tells_the_serverapp_where_the_api_is(
    server_min: Rendered, server_prod: Rendered
) -> None:
    for rendered, retry, heartbeat in ((server_min, "900", "2"), (server_prod, "1200", "3")):
        link = _pod(rendered, "superlink")
        container = link["spec"]["containers"][0]
        env = _container_env(rendered, container)
        assert env["CONCORD_SERVERAPP_API_URL"] == API_SERVICE_URL
        api_service = rendered.get("Service", "consortium-server")
        service_url = (
            f"http://{api_service['metadata']['name']}.concord.svc:"
            f"{api_service['spec']['ports'][0]['port']}"
        )
        assert service_url == API_SERVICE_URL
        assert env["CONCORD_SERVERAPP_RETRY_S"] == retry
        assert env["CONCORD_SERVERAPP_HEARTBEAT_S"] == heartbeat
        assert "CONCORD_SERVERAPP_CA_FILE" not in env  # plain HTTP inside the cluster
        secret, key, mode = _mounted_file(link, container, env["CONCORD_SERVERAPP_TOKEN_FILE"])
        assert mode == 0o440
        api = _pod(rendered, "consortium-server")
        api_container = api["spec"]["containers"][0]
        api_env = _container_env(rendered, api_container)
        api_token = api_env["CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE"]
        assert _mounted_file(api, api_container, api_token) == (secret, key, mode)
    settings = server_prod.get("ConfigMap", "-settings")["data"]
    assert settings["CONCORD_FEDERATION__RUN_LIVENESS_S"] == "45"
    assert settings["CONCORD_FEDERATION__MAX_RESTARTS"] == "5"


def test_no_removed_federation_setting_is_rendered(rendered: tuple[str, str, Rendered]) -> None:
    """ServerSettings forbids unknown fields: a removed setting would stop the server."""
    _, _, result = rendered
    text = "\n".join(result.templates.values())
    for name in REMOVED_SETTINGS:
        assert f"CONCORD_FEDERATION__{name}" not in text, name


def test_heartbeat_must_be_shorter_than_liveness() -> None:
    values = merge(
        load_values("server-minimal.yaml"),
        {"federation": {"runLivenessSeconds": 10, "serverappHeartbeatSeconds": 10}},
    )
    with pytest.raises(helm_python.HelmRenderError, match="serverappHeartbeatSeconds"):
        render("server", values)


def test_superlink_and_api_may_talk_for_round_reports(
    server_min: Rendered, server_prod: Rendered
) -> None:
    api_pods = {
        "app.kubernetes.io/name": "consortium-server",
        "app.kubernetes.io/instance": "concord",
        "app.kubernetes.io/component": "api",
    }
    link_pods = {**api_pods, "app.kubernetes.io/component": "superlink"}
    for rendered in (server_min, server_prod):
        api = rendered.get("NetworkPolicy", "consortium-server")["spec"]
        # A rule of its own: apiIngressFrom (set in production) does not narrow it.
        assert {
            "from": [{"podSelector": {"matchLabels": link_pods}}],
            "ports": [{"port": 8600, "protocol": "TCP"}],
        } in api["ingress"]
        link = rendered.get("NetworkPolicy", "superlink")["spec"]
        assert {
            "to": [{"podSelector": {"matchLabels": api_pods}}],
            "ports": [{"port": 8600, "protocol": "TCP"}],
        } in link["egress"]
    # In production the first API rule stays limited to apiIngressFrom.
    first = server_prod.get("NetworkPolicy", "consortium-server")["spec"]["ingress"][0]
    assert first["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]


def test_notes_explain_the_round_reports_and_token_rotation(
    server_min: Rendered, server_prod: Rendered
) -> None:
    for rendered, secret in ((server_min, TOKEN_SECRET), (server_prod, "concord-federation")):
        notes = rendered.notes
        assert "/internal/v1/federation" in notes
        assert "federation token" in notes
        assert "no volume is shared" in notes
        assert f"patch secret {secret}" in notes
        assert (
            "rollout restart deployment/concord-consortium-server "
            "deployment/concord-consortium-server-superlink"
        ) in notes


# --- what the site chart renders ---------------------------------------------------------


def test_site_runs_the_agent_and_the_supernode(site_prod: Rendered) -> None:
    spec = site_prod.get("Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers["agent"]["command"] == ["tini", "-g", "--", "site-node", "run"]
    supernode = containers["supernode"]
    # The site's guarded ClientApp runner, then flower-supernode with the args.
    assert supernode["command"] == [
        "tini",
        "-g",
        "--",
        "site-node",
        "supernode",
        "--socket",
        "/tmp/concord-runner/clientapp.sock",
        "--",
    ]
    args = supernode["args"]
    assert args[args.index("--superlink") + 1] == "fl.example.org:9092"
    assert "--insecure" not in args
    assert args[args.index("--auth-supernode-private-key") + 1].endswith("/keys/supernode")
    # The ClientApp's settings come from the node config (site_node/federation/clientapp.py):
    # the same site, state dir and datasets file as the agent's settings, then the extras.
    from flwr.common.config import parse_config_args  # Flower's own parser of the flag

    node_config = parse_config_args([args[args.index("--node-config") + 1]])
    settings = site_prod.get("ConfigMap", "-settings")["data"]
    assert node_config == {
        "site-id": settings["CONCORD_SITE_SITE_ID"],
        "state-dir": settings["CONCORD_SITE_STATE_DIR"],
        "datasets-file": settings["CONCORD_SITE_DATASETS_FILE"],
        "max-threads": 4,
    }
    # The ClientAppIo API stays on loopback, on the port the values name.
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "9094"


def test_site_data_is_read_only(site_min: Rendered, site_prod: Rendered) -> None:
    for result, source in ((site_min, "persistentVolumeClaim"), (site_prod, "hostPath")):
        spec = result.get("Deployment")["spec"]["template"]["spec"]
        volume = {v["name"]: v for v in spec["volumes"]}["hospital-data"]
        assert source in volume
        if source == "persistentVolumeClaim":
            assert volume[source]["readOnly"] is True
        for container in spec["containers"]:
            mount = {m["name"]: m for m in container["volumeMounts"]}["hospital-data"]
            assert mount["readOnly"] is True
            assert mount["mountPath"] == "/data"


def test_site_network_policy_denies_ingress_and_limits_egress(site_prod: Rendered) -> None:
    policy = site_prod.get("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == []
    dns, consortium = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert [t["ipBlock"]["cidr"] for t in consortium["to"]] == [
        "203.0.113.10/32",
        "203.0.113.11/32",
    ]
    assert [p["port"] for p in consortium["ports"]] == [443, 9092]
    assert site_prod.all("Service") == []
    assert site_prod.all("Ingress") == []


def test_site_files_carry_datasets_and_policy(site_prod: Rendered) -> None:
    data = site_prod.get("ConfigMap", "-site")["data"]
    datasets = yaml.safe_load(data["datasets.yaml"])
    assert [d["id"] for d in datasets] == ["bc-tabular", "chest-ct"]
    assert set(data) == {"datasets.yaml", "policy.00-base.cedar", "policy.epsilon-cap.cedar"}
    assert site_prod.all("Secret") == []


def test_site_policy_is_mounted_where_the_site_settings_point(
    site_min: Rendered, site_prod: Rendered
) -> None:
    """sitePolicy: a ConfigMap of .cedar files, mounted as one directory in both containers,
    named by CONCORD_SITE_POLICY_DIR; without it the variable is unset (the shipped
    site-default applies) and no policy file is rendered."""
    settings = site_prod.get("ConfigMap", "-settings")["data"]
    policy_dir = settings["CONCORD_SITE_POLICY_DIR"]
    assert policy_dir == "/etc/concord/site/policy"
    spec = site_prod.get("Deployment")["spec"]["template"]["spec"]
    volume = {v["name"]: v for v in spec["volumes"]}["site-files"]["configMap"]
    assert volume["name"] == site_prod.get("ConfigMap", "-site")["metadata"]["name"]
    for container in spec["containers"]:
        mount = {m["name"]: m for m in container["volumeMounts"]}["site-files"]
        assert mount["readOnly"] is True
        files = {
            f"{mount['mountPath']}/{i['path']}": i["key"]
            for i in volume["items"]
            if f"{mount['mountPath']}/{i['path']}".startswith(policy_dir + "/")
        }
        assert files == {
            f"{policy_dir}/00-base.cedar": "policy.00-base.cedar",
            f"{policy_dir}/epsilon-cap.cedar": "policy.epsilon-cap.cedar",
        }, container["name"]
        assert any(s["configMapRef"]["name"].endswith("-settings") for s in container["envFrom"]), (
            container["name"]
        )
    # Not set: no directory named, no policy files (the site uses its shipped default).
    assert "CONCORD_SITE_POLICY_DIR" not in site_min.get("ConfigMap", "-settings")["data"]
    assert set(site_min.get("ConfigMap", "-site")["data"]) == {"datasets.yaml"}


@pytest.mark.parametrize("values_file", ["site-minimal.yaml", "site-production.yaml"])
def test_site_runs_in_production_and_its_rendered_settings_pass(
    values_file: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart sets CONCORD_SITE_ENVIRONMENT=production by default; the settings it renders
    pass the production checks (https URLs, client credentials), and so do the SuperNode's
    arguments once the consortium CA is where the chart mounts it."""
    from site_node.settings import Environment, SiteSettings

    result = render("site", load_values(values_file))
    env = result.get("ConfigMap", "-settings")["data"]
    assert env["CONCORD_SITE_ENVIRONMENT"] == "production"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONCORD_SITE_CLIENT_SECRET", "from-the-secret")
    settings = SiteSettings()
    assert settings.environment is Environment.PRODUCTION
    supernode = {
        c["name"]: c for c in result.get("Deployment")["spec"]["template"]["spec"]["containers"]
    }["supernode"]
    args = list(supernode["args"])
    ca_index = args.index("--root-certificates") + 1
    assert args[ca_index] == "/etc/concord/consortium-ca/ca.crt"
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args[ca_index] = str(ca)  # the mount, on this machine
    settings.check_supernode_args(args)


def test_site_chart_may_not_be_put_in_another_environment() -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render("site", merge(load_values("site-minimal.yaml"), {"environment": "staging"}))
    assert "/environment" in str(caught.value)
