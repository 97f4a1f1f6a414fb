"""The Helm charts render, lint clean, validate against Kubernetes' schemas, and refuse
bad values with Helm's schema error. Real Helm (v4 as a library), no cluster."""

from __future__ import annotations

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
    pod_specs,
    render,
)

KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
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
        if c["command"][0].startswith("flower-") or c["command"][:2] == ["site-node", "supernode"]
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
    ],
    ids=["latest-tag", "ingress-without-host", "two-data-sources", "no-egress-cidr", "bad-dataset"],
)
def test_schema_refuses_unsafe_combinations(
    chart: str, base: str, override: dict[str, Any], where: str
) -> None:
    from tests.deploy.charts import merge

    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(chart, merge(load_values(base), override))
    assert where in str(caught.value)


def test_schemas_forbid_unknown_keys_everywhere() -> None:
    """Every object in both schemas that lists properties forbids others."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("type") == "object":
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
    assert api["containers"][0]["command"] == ["consortium", "server"]
    assert [c["command"][:3] for c in api["initContainers"]] == [
        ["install", "-m", "0600"],
        ["consortium", "db", "current"],
    ]
    job = server_min.get("Job", "-migrate-1")["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["consortium", "db", "upgrade"]
    superlink = server_min.get("Deployment", "superlink")["spec"]["template"]["spec"]
    args = superlink["containers"][0]["args"]
    assert superlink["containers"][0]["command"] == ["flower-superlink"]
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
    ):
        assert flag in args
    assert "--insecure" not in args
    assert args[args.index("--database") + 1].startswith("/var/lib/flower/")
    mounts = {m["mountPath"]: m["name"] for m in superlink["containers"][0]["volumeMounts"]}
    claim = {v["name"]: v for v in superlink["volumes"]}[mounts["/var/lib/flower"]]
    assert "persistentVolumeClaim" in claim


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
    assert api["containers"][0]["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert server_prod.get("Ingress")["spec"]["tls"][0]["hosts"] == ["concord.example.org"]
    paths = [p["path"] for p in server_prod.get("Ingress")["spec"]["rules"][0]["http"]["paths"]]
    assert not {"/", "/healthz", "/readyz", "/metrics"} & set(paths)
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
        "concord-consortium-server-database",
        "concord-consortium-server-superlink-tls",
    ]
    audit = server_min.get("Secret", "audit-key")
    assert audit["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_server_network_policies(server_prod: Rendered) -> None:
    api = server_prod.get("NetworkPolicy", "consortium-server")["spec"]
    assert api["policyTypes"] == ["Ingress", "Egress"]
    assert [p["port"] for p in api["ingress"][0]["ports"]] == [8600]
    egress_ports = {p["port"] for rule in api["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 9092, 5432, 443, 8443}
    link = server_prod.get("NetworkPolicy", "superlink")["spec"]
    cidrs = [f["ipBlock"]["cidr"] for f in link["ingress"][0]["from"] if "ipBlock" in f]
    assert cidrs == ["198.51.100.0/24", "203.0.113.7/32"]


# --- what the site chart renders ---------------------------------------------------------


def test_site_runs_the_agent_and_the_supernode(site_prod: Rendered) -> None:
    spec = site_prod.get("Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers["agent"]["command"] == ["site-node", "run"]
    supernode = containers["supernode"]
    # The site's guarded ClientApp runner, then flower-supernode with the args.
    assert supernode["command"] == [
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
    assert args[args.index("--node-config") + 1] == 'site-id="hospital-b" max-threads=4'


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
