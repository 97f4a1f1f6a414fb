"""One test per chart setting: each renders the setting (Helm as a library, no cluster),
checks the manifests it changes, and that the schema refuses a wrong type for it.

The settings: extra env, volumes and mounts; an outbound proxy; extended resources (GPUs)
and runtimeClassName; ids left to the platform (OpenShift); `global` (subcharts); pod
annotations and labels, priorityClassName, topologySpreadConstraints and ServiceAccount
annotations; the server's database from host, port, name, user and a password Secret; the
SuperLink Service's externalTrafficPolicy; the DNS egress rule; `helm test` in both charts;
the migration Job as a Helm hook; checksum annotations; publishing policies on upgrade;
probes of every container; the Ingress's body size; and the extra CA bundle, the pinned
audit tree-head key and the SuperNode's runtime port and node config.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest

from tests.deploy.charts import (
    CHART_OF,
    NAMESPACE,
    RELEASE,
    Rendered,
    load_values,
    merge,
    pod_specs,
    render,
)

BASE = {"server": "server-minimal.yaml", "site": "site-minimal.yaml"}
PROD = {"server": "server-production.yaml", "site": "site-production.yaml"}
PEM = "-----BEGIN CERTIFICATE-----\nextra-ca-placeholder\n-----END CERTIFICATE-----\n"
HEAD_KEY = (
    "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # base64 of a raw 32-byte Ed25519 public key
)
HOOK = "helm.sh/hook"
WEIGHT = "helm.sh/hook-weight"


# --- helpers -----------------------------------------------------------------------------


def values(chart: str, override: dict[str, Any] | None = None, base: str = "") -> dict[str, Any]:
    return merge(load_values(base or BASE[chart]), override or {})


def server(override: dict[str, Any] | None = None, base: str = "") -> Rendered:
    return render("server", values("server", override, base))


def site(override: dict[str, Any] | None = None, base: str = "") -> Rendered:
    return render("site", values("site", override, base))


def refused(chart: str, override: dict[str, Any], where: str, base: str = "") -> None:
    """The schema refuses ``override`` (over the chart's minimal values) at ``where``."""
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(chart, values(chart, override, base))
    message = str(caught.value)
    assert "values don't meet the specifications of the schema" in message
    assert where in message, message


def render_release(
    chart: str, data: dict[str, Any], *, revision: int, upgrade: bool = False
) -> Rendered:
    loaded = helm_python.Chart.load(str(CHART_OF[chart]))
    templates = loaded.render(
        data,
        name=RELEASE[chart],
        namespace=NAMESPACE,
        revision=revision,
        is_install=not upgrade,
        is_upgrade=upgrade,
    )
    return Rendered(templates)


def pods(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """Object name -> pod template (metadata and spec) of every workload."""
    out = {}
    for doc in rendered.docs():
        if doc["kind"] in ("Deployment", "Job"):
            out[doc["metadata"]["name"]] = doc["spec"]["template"]
        elif doc["kind"] == "Pod":
            out[doc["metadata"]["name"]] = doc
    return out


def pod(rendered: Rendered, kind: str, suffix: str = "") -> dict[str, Any]:
    doc = rendered.get(kind, suffix)
    return doc if kind == "Pod" else doc["spec"]["template"]


def containers(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = template["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def container(rendered: Rendered, kind: str, suffix: str, name: str) -> dict[str, Any]:
    return containers(pod(rendered, kind, suffix))[name]


def env(item: dict[str, Any]) -> dict[str, Any]:
    """A container's env: name -> value (or its valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in item.get("env", [])}


def mounts(item: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in item.get("volumeMounts", [])}


def volumes(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in template["spec"].get("volumes", [])}


def validate_strictly(rendered: Rendered) -> None:
    for doc in rendered.docs():
        try:
            kubernetes_validate.validate(doc, "1.33.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")


def is_hook(doc: dict[str, Any]) -> bool:
    return HOOK in (doc["metadata"].get("annotations") or {})


def sha256(rendered: Rendered, chart: str, template: str) -> str:
    text = rendered.templates[f"{CHART_OF[chart].name}/templates/{template}"]
    return hashlib.sha256(text.encode()).hexdigest()


EXTRA_ENV = [
    {"name": "EXTRA_PLAIN", "value": "1"},
    {"name": "EXTRA_FROM", "valueFrom": {"secretKeyRef": {"name": "extra", "key": "k"}}},
]
EXTRA_VOLUMES = [{"name": "extra-ca", "configMap": {"name": "db-ca"}}]
EXTRA_MOUNTS = [{"name": "extra-ca", "mountPath": "/etc/extra-ca", "readOnly": True}]
EVERYTHING = {
    "server": {
        "global": {
            "imageRegistry": "mirror.example.org",
            "imagePullSecrets": ["mirror-pull", {"name": "regcred"}],
            "someParentValue": {"anything": True},
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.org/every": "pod"},
        "podLabels": {"team": "fl"},
        "runtimeClassName": "gvisor",
        "proxy": {
            "httpProxy": "http://proxy.example.org:3128",
            "httpsProxy": "http://proxy.example.org:3128",
            "noProxy": "postgres.internal,.corp.example.org",
        },
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "caBundle": {"certificates": PEM},
        "migrations": {"podAnnotations": {"sidecar.istio.io/inject": "false"}},
        "server": {
            "podLabels": {"tier": "api"},
            "priorityClassName": "concord-high",
            "extraEnv": EXTRA_ENV,
            "extraVolumes": EXTRA_VOLUMES,
            "extraVolumeMounts": EXTRA_MOUNTS,
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "topology.kubernetes.io/zone",
                    "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "api"}},
                }
            ],
        },
        "superlink": {
            "podAnnotations": {"example.org/link": "yes"},
            "podLabels": {"tier": "federation"},
            "priorityClassName": "concord-critical",
            "extraEnv": EXTRA_ENV,
            "extraVolumes": EXTRA_VOLUMES,
            "extraVolumeMounts": EXTRA_MOUNTS,
            "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"},
        },
        "ingress": {"enabled": True, "className": "nginx", "host": "concord.example.org"},
        "networkPolicy": {
            "apiIngressFrom": [{"namespaceSelector": {"matchLabels": {"x": "y"}}}],
            "dns": {
                "namespace": "openshift-dns",
                "podSelector": {"dns.operator.openshift.io/daemonset-dns": "default"},
                "ports": [5353],
            },
        },
    },
    "site": {
        "global": {"imageRegistry": "mirror.hospital.example", "imagePullSecrets": ["mirror"]},
        "podAnnotations": {"example.org/every": "pod"},
        "podLabels": {"team": "fl"},
        "priorityClassName": "site-high",
        "runtimeClassName": "nvidia",
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ],
        "proxy": {
            "httpsProxy": "http://proxy.hospital.example:3128",
            "noProxy": ".hospital.example",
        },
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "x@y.iam"}},
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "caBundle": {"certificates": PEM},
        "consortium": {"auditHeadKey": HEAD_KEY},
        "extraVolumes": EXTRA_VOLUMES,
        "agent": {"extraEnv": EXTRA_ENV, "extraVolumeMounts": EXTRA_MOUNTS},
        "supernode": {
            "runtimePort": 9190,
            "extraEnv": EXTRA_ENV,
            "extraVolumeMounts": EXTRA_MOUNTS,
            "resources": {
                "requests": {"cpu": "2", "memory": "8Gi"},
                "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},
            },
        },
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "networkPolicy": {
            "dns": {
                "namespace": "kube-system",
                "podSelector": {"k8s-app": "coredns"},
                "ports": [53],
            }
        },
    },
}


@pytest.mark.parametrize("chart", ["server", "site"])
def test_every_setting_at_once_renders_valid_kubernetes_and_lints_clean(chart: str) -> None:
    rendered = render(chart, values(chart, EVERYTHING[chart]))
    validate_strictly(rendered)
    report = helm_python.lint(str(CHART_OF[chart]), values(chart, EVERYTHING[chart]), strict=True)
    assert report["errors"] == [], report
    assert report["messages"] == [], report


# --- 1. extraEnv, extraVolumes, extraVolumeMounts ----------------------------------------


def test_server_extra_env_volumes_and_mounts() -> None:
    extra = {
        "extraEnv": EXTRA_ENV,
        "extraVolumes": EXTRA_VOLUMES,
        "extraVolumeMounts": EXTRA_MOUNTS,
    }
    rendered = server({"server": extra, "superlink": extra})
    # The API container, the init container that runs the same program, the migration Job.
    for kind, suffix, name in (
        ("Deployment", "consortium-server", "api"),
        ("Deployment", "consortium-server", "wait-for-migrations"),
        ("Job", "-migrate", "migrate"),
        ("Deployment", "superlink", "superlink"),
    ):
        item = container(rendered, kind, suffix, name)
        assert env(item)["EXTRA_PLAIN"] == "1", name
        assert env(item)["EXTRA_FROM"] == {"secretKeyRef": {"name": "extra", "key": "k"}}, name
        assert item["env"][-1]["name"] == "EXTRA_FROM", name  # last: it wins over the chart's
        assert mounts(item)["/etc/extra-ca"] == EXTRA_MOUNTS[0], name
        assert volumes(pod(rendered, kind, suffix))["extra-ca"] == EXTRA_VOLUMES[0], name
    # Not where nothing asked for them.
    assert "EXTRA_PLAIN" not in env(container(rendered, "Pod", "test-readyz", "readyz"))
    assert "EXTRA_PLAIN" not in env(
        container(server({"superlink": extra}), "Deployment", "consortium-server", "api")
    )


def test_site_extra_env_volumes_and_mounts() -> None:
    rendered = site(
        {
            "extraVolumes": EXTRA_VOLUMES,
            "agent": {"extraEnv": EXTRA_ENV, "extraVolumeMounts": EXTRA_MOUNTS},
            "supernode": {"extraEnv": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
        }
    )
    template = pod(rendered, "Deployment")
    agent, supernode = containers(template)["agent"], containers(template)["supernode"]
    assert env(agent)["EXTRA_PLAIN"] == "1"
    assert mounts(agent)["/etc/extra-ca"] == EXTRA_MOUNTS[0]
    assert env(supernode)["NCCL_DEBUG"] == "INFO"
    assert "EXTRA_PLAIN" not in env(supernode)
    assert "/etc/extra-ca" not in mounts(supernode)
    assert volumes(template)["extra-ca"] == EXTRA_VOLUMES[0]


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        (
            "server",
            {"server": {"extraEnv": [{"name": "X", "vaule": "typo"}]}},
            "/server/extraEnv/0",
        ),
        ("server", {"server": {"extraEnv": {"X": "1"}}}, "/server/extraEnv"),
        (
            "server",
            {"server": {"extraEnv": [{"name": "X", "value": 1}]}},
            "/server/extraEnv/0/value",
        ),
        (
            "server",
            {"superlink": {"extraVolumes": [{"name": "only-a-name"}]}},
            "/superlink/extraVolumes/0",
        ),
        (
            "server",
            {"server": {"extraVolumeMounts": [{"name": "x"}]}},
            "/server/extraVolumeMounts/0",
        ),
        ("site", {"extraVolumes": {"name": "x"}}, "/extraVolumes"),
        (
            "site",
            {"supernode": {"extraVolumeMounts": [{"name": "x", "mountPath": "relative"}]}},
            "/supernode/extraVolumeMounts/0/mountPath",
        ),
        ("site", {"agent": {"extraEnv": [{"value": "no name"}]}}, "/agent/extraEnv/0"),
    ],
)
def test_schema_refuses_malformed_extras(chart: str, override: dict[str, Any], where: str) -> None:
    refused(chart, override, where)


# --- 2. proxy ----------------------------------------------------------------------------

PROXY = {
    "httpProxy": "http://proxy.example.org:3128",
    "httpsProxy": "http://proxy.example.org:3128",
    "noProxy": "postgres.internal, .corp.example.org",
}
PROXY_NAMES = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}


def test_server_proxy_reaches_the_api_container_only() -> None:
    rendered = server({"proxy": PROXY})
    api = env(container(rendered, "Deployment", "consortium-server", "api"))
    assert api["HTTPS_PROXY"] == api["https_proxy"] == PROXY["httpsProxy"]
    assert api["HTTP_PROXY"] == api["http_proxy"] == PROXY["httpProxy"]
    no_proxy = api["NO_PROXY"].split(",")
    assert api["no_proxy"] == api["NO_PROXY"]
    # The user's entries, then what must never go through a proxy: loopback and the
    # cluster's names, including the host the API dials for the SuperLink's Control API.
    control_host = api_settings(rendered)["CONCORD_FEDERATION__SUPERLINK_ADDRESS"].split(":")[0]
    assert no_proxy[:2] == ["postgres.internal", ".corp.example.org"]
    assert {"localhost", "127.0.0.1", ".svc", ".cluster.local", control_host} <= set(no_proxy)
    # The SuperLink (in-cluster only), the migration Job and the wait container get none.
    for kind, suffix, name in (
        ("Deployment", "superlink", "superlink"),
        ("Job", "-migrate", "migrate"),
        ("Deployment", "consortium-server", "wait-for-migrations"),
    ):
        assert not PROXY_NAMES & set(env(container(rendered, kind, suffix, name))), name
    # No proxy set, no variables.
    assert not PROXY_NAMES & set(env(container(server(), "Deployment", "consortium-server", "api")))


def test_server_proxy_keeps_a_custom_superlink_address_direct() -> None:
    rendered = server(
        {
            "proxy": {"httpsProxy": PROXY["httpsProxy"]},
            "federation": {"superlinkAddress": "link.fl:9093"},
        }
    )
    api = env(container(rendered, "Deployment", "consortium-server", "api"))
    assert "link.fl" in api["NO_PROXY"].split(",")
    assert "HTTP_PROXY" not in api  # only what is set


def test_site_proxy_reaches_the_agent_the_supernode_and_the_test_pod() -> None:
    rendered = site({"proxy": {"httpsProxy": PROXY["httpsProxy"], "noProxy": ".hospital.example"}})
    for kind, name in (("Deployment", "agent"), ("Deployment", "supernode"), ("Pod", "consortium")):
        item = env(container(rendered, kind, "", name))
        assert item["HTTPS_PROXY"] == item["https_proxy"] == PROXY["httpsProxy"], name
        # gRPC would otherwise proxy the SuperNode's own ClientAppIo API on 127.0.0.1.
        assert {".hospital.example", "127.0.0.1", "localhost"} <= set(item["no_proxy"].split(","))
    install = container(rendered, "Deployment", "", "install-site-keys")
    assert not PROXY_NAMES & set(env(install))


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        ("server", {"proxy": {"httpsProxy": "proxy.example.org:3128"}}, "/proxy/httpsProxy"),
        ("server", {"proxy": {"noProxy": ["a", "b"]}}, "/proxy/noProxy"),
        ("site", {"proxy": {"httpProxy": 3128}}, "/proxy/httpProxy"),
        ("site", {"proxy": {"ftpProxy": "http://x"}}, "'ftpProxy' not allowed"),
    ],
)
def test_schema_refuses_a_malformed_proxy(chart: str, override: dict[str, Any], where: str) -> None:
    refused(chart, override, where)


# --- 3. GPUs and runtimeClassName --------------------------------------------------------


def test_site_supernode_may_ask_for_a_gpu_and_a_runtime_class() -> None:
    resources = {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1, "ephemeral-storage": "20Gi"},
    }
    rendered = site({"supernode": {"resources": resources}, "runtimeClassName": "nvidia"})
    template = pod(rendered, "Deployment")
    assert containers(template)["supernode"]["resources"] == resources
    assert "nvidia.com/gpu" not in containers(template)["agent"]["resources"]["limits"]
    assert template["spec"]["runtimeClassName"] == "nvidia"
    validate_strictly(rendered)
    assert "runtimeClassName" not in pod(site(), "Deployment")["spec"]


def test_server_runtime_class_and_extended_resources() -> None:
    rendered = server(
        {
            "runtimeClassName": "gvisor",
            "superlink": {
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi", "hugepages-2Mi": "64Mi"},
                    "limits": {"cpu": "2", "memory": "2Gi", "hugepages-2Mi": "64Mi"},
                }
            },
        }
    )
    for name, template in pods(rendered).items():
        if name.endswith("test-readyz"):
            assert "runtimeClassName" not in template["spec"]
        else:
            assert template["spec"]["runtimeClassName"] == "gvisor", name
    link = container(rendered, "Deployment", "superlink", "superlink")
    assert link["resources"]["limits"]["hugepages-2Mi"] == "64Mi"


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        (
            "site",
            {
                "supernode": {
                    "resources": {"limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "lots"}}
                }
            },
            "/supernode/resources/limits/nvidia.com~1gpu",
        ),
        (
            "site",
            {"supernode": {"resources": {"limits": {"cpu": "1", "memory": "1Gi", "gpu": 1}}}},
            "'gpu' not allowed",
        ),
        ("site", {"runtimeClassName": "NVIDIA runtime"}, "/runtimeClassName"),
        ("server", {"runtimeClassName": True}, "/runtimeClassName"),
    ],
)
def test_schema_refuses_bad_resources_and_runtime_class(
    chart: str, override: dict[str, Any], where: str
) -> None:
    refused(chart, override, where)


# --- 4. ids left to the platform (OpenShift restricted SCC) -------------------------------

PLATFORM_IDS = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}


@pytest.mark.parametrize("chart", ["server", "site"])
def test_null_ids_are_left_to_the_platform(chart: str) -> None:
    rendered = render(chart, values(chart, PLATFORM_IDS, PROD[chart]))
    specs = pod_specs(rendered)
    assert len(specs) >= 2
    for name, spec in specs:
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context), name
        for item in spec.get("initContainers", []) + spec["containers"]:
            assert "runAsUser" not in item["securityContext"], (name, item["name"])
            assert item["securityContext"]["runAsNonRoot"] is True
    # One may be kept (e.g. a fixed fsGroup) while the others go.
    kept = render(
        chart, values(chart, {"podSecurityContext": {"runAsUser": None, "runAsGroup": None}})
    )
    for name, spec in pod_specs(kept):
        assert spec["securityContext"]["fsGroup"] == 10001, name
        assert "runAsUser" not in spec["securityContext"], name
    # The default stays the image's user.
    for _, spec in pod_specs(render(chart, values(chart))):
        assert spec["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        ("server", {"podSecurityContext": {"runAsUser": "10001"}}, "/podSecurityContext/runAsUser"),
        ("server", {"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
        ("site", {"podSecurityContext": {"fsGroup": "x"}}, "/podSecurityContext/fsGroup"),
    ],
)
def test_schema_refuses_bad_ids(chart: str, override: dict[str, Any], where: str) -> None:
    refused(chart, override, where)


# --- 5. global (the charts as subcharts) ---------------------------------------------------


@pytest.mark.parametrize(
    ("chart", "mirrored"),
    [
        ("server", "mirror.example.org:5000/concord-fl/concord-server:0.1.0"),
        ("site", "mirror.example.org:5000/concord-fl/concord-site-node:0.1.0"),
    ],
)
def test_global_image_registry_and_pull_secrets(chart: str, mirrored: str) -> None:
    override = {
        "imagePullSecrets": [{"name": "regcred"}],
        "caBundle": {"certificates": PEM},
        "global": {
            "imageRegistry": "mirror.example.org:5000",
            "imagePullSecrets": ["mirror", {"name": "regcred"}],
            "postgresql": {"auth": {"username": "a parent chart's value"}},
        },
    }
    rendered = render(chart, values(chart, override))
    specs = pod_specs(rendered)
    assert len(specs) >= 2
    for name, spec in specs:
        for item in spec.get("initContainers", []) + spec["containers"]:
            assert item["image"] == mirrored, (name, item["name"])
        assert spec["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}], name
    # A digest stays a digest; a repository without a registry host just gets the mirror.
    digest = "sha256:" + "ab" * 32
    override["image"] = {"repository": "concord/image", "digest": digest}
    for _, spec in pod_specs(render(chart, values(chart, override))):
        assert spec["containers"][0]["image"] == f"mirror.example.org:5000/concord/image@{digest}"
    # Without global, the images and pull Secrets are the chart's own.
    for _, spec in pod_specs(render(chart, values(chart, {"global": {}}))):
        assert spec["containers"][0]["image"].startswith("ghcr.io/concord-fl/")
        assert "imagePullSecrets" not in spec


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        ("server", {"global": "yes"}, "/global"),
        ("server", {"global": {"imageRegistry": 5}}, "/global/imageRegistry"),
        ("site", {"global": {"imagePullSecrets": [{"nam": "x"}]}}, "/global/imagePullSecrets/0"),
    ],
)
def test_schema_refuses_a_malformed_global(
    chart: str, override: dict[str, Any], where: str
) -> None:
    refused(chart, override, where)


# --- 6. pod annotations and labels, priority, spread, ServiceAccount annotations ----------


def test_server_pod_annotations_and_labels_on_every_workload() -> None:
    rendered = server(
        {
            "podAnnotations": {"example.org/every": "pod", "checksum/settings": "not-mine"},
            "podLabels": {"team": "fl", "app.kubernetes.io/component": "hijack"},
            "server": {"podAnnotations": {"example.org/api": "1"}, "podLabels": {"tier": "api"}},
            "superlink": {"podAnnotations": {"example.org/link": "1"}, "podLabels": {"tier": "fl"}},
            "migrations": {"podAnnotations": {"sidecar.istio.io/inject": "false"}},
        }
    )
    templates = pods(rendered)
    assert len(templates) == 4  # API, SuperLink, migration Job, helm test
    for name, template in templates.items():
        labels, annotations = template["metadata"]["labels"], template["metadata"]["annotations"]
        assert labels["team"] == "fl", name
        assert labels["app.kubernetes.io/component"] != "hijack", name  # the chart's win
        assert annotations["example.org/every"] == "pod", name
    api = pod(rendered, "Deployment", "consortium-server")["metadata"]
    assert api["annotations"]["checksum/settings"] != "not-mine"  # the chart's win
    assert (api["labels"]["tier"], api["annotations"]["example.org/api"]) == ("api", "1")
    assert len(api["annotations"]["checksum/settings"]) == 64
    link = pod(rendered, "Deployment", "superlink")["metadata"]
    assert (link["labels"]["tier"], link["annotations"]["example.org/link"]) == ("fl", "1")
    job = pod(rendered, "Job", "-migrate")["metadata"]
    assert job["annotations"]["sidecar.istio.io/inject"] == "false"
    assert "tier" not in job["labels"]
    test_pod = rendered.get("Pod", "test-readyz")["metadata"]["annotations"]
    assert test_pod[HOOK] == "test"
    # Selectors still select: the Deployments' pods keep their component labels.
    for suffix in ("consortium-server", "superlink"):
        deployment = rendered.get("Deployment", suffix)
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_site_pod_annotations_and_labels() -> None:
    rendered = site({"podAnnotations": {"example.org/a": "b"}, "podLabels": {"team": "fl"}})
    for name, template in pods(rendered).items():
        assert template["metadata"]["labels"]["team"] == "fl", name
        assert template["metadata"]["annotations"]["example.org/a"] == "b", name
    deployment = rendered.get("Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_priority_class_names() -> None:
    rendered = server(
        {
            "server": {"priorityClassName": "concord-high"},
            "superlink": {"priorityClassName": "crit"},
        }
    )
    assert pod(rendered, "Deployment", "consortium-server")["spec"]["priorityClassName"] == (
        "concord-high"
    )
    assert pod(rendered, "Deployment", "superlink")["spec"]["priorityClassName"] == "crit"
    assert pod(site({"priorityClassName": "site-high"}), "Deployment")["spec"][
        "priorityClassName"
    ] == ("site-high")
    assert "priorityClassName" not in pod(server(), "Deployment", "consortium-server")["spec"]


def test_api_topology_spread_keeps_its_default() -> None:
    default = pod(server(), "Deployment", "consortium-server")["spec"]
    [spread] = default["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    zones = [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
        }
    ]
    custom = pod(
        server({"server": {"topologySpreadConstraints": zones}}), "Deployment", "consortium-server"
    )
    assert custom["spec"]["topologySpreadConstraints"] == zones
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "a", "operator": "Exists"}]}]
            }
        }
    }
    with_affinity = pod(
        server({"server": {"affinity": affinity}}), "Deployment", "consortium-server"
    )
    assert with_affinity["spec"]["affinity"] == affinity
    assert "topologySpreadConstraints" not in with_affinity["spec"]  # as before
    both = server({"server": {"affinity": affinity, "topologySpreadConstraints": zones}})
    assert (
        pod(both, "Deployment", "consortium-server")["spec"]["topologySpreadConstraints"] == zones
    )
    site_spread = pod(site({"topologySpreadConstraints": zones}), "Deployment")["spec"]
    assert site_spread["topologySpreadConstraints"] == zones
    assert "topologySpreadConstraints" not in pod(site(), "Deployment")["spec"]


def test_service_account_annotations() -> None:
    irsa = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/concord"}
    rendered = server({"serviceAccount": {"annotations": irsa}})
    accounts = {a["metadata"]["name"]: a for a in rendered.all("ServiceAccount")}
    assert set(accounts) == {"concord-consortium-server", "concord-consortium-server-migrate"}
    for name, account in accounts.items():
        assert irsa.items() <= account["metadata"]["annotations"].items(), name
    assert accounts["concord-consortium-server-migrate"]["metadata"]["annotations"][HOOK]
    [site_account] = site({"serviceAccount": {"annotations": irsa}}).all("ServiceAccount")
    assert site_account["metadata"]["annotations"] == irsa
    assert "annotations" not in site().all("ServiceAccount")[0]["metadata"]


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        ("server", {"podLabels": {"team": "two words"}}, "/podLabels/team"),
        ("server", {"server": {"podLabels": {"n": 1}}}, "/server/podLabels/n"),
        ("server", {"superlink": {"podAnnotations": {"a": True}}}, "/superlink/podAnnotations/a"),
        ("server", {"migrations": {"podLabels": []}}, "/migrations/podLabels"),
        ("server", {"server": {"priorityClassName": "High"}}, "/server/priorityClassName"),
        (
            "server",
            {"server": {"topologySpreadConstraints": [{"maxSkew": 1}]}},
            "/server/topologySpreadConstraints/0",
        ),
        ("server", {"serviceAccount": {"annotations": {"a": 1}}}, "/serviceAccount/annotations/a"),
        ("site", {"podAnnotations": ["a"]}, "/podAnnotations"),
        ("site", {"priorityClassName": 5}, "/priorityClassName"),
    ],
)
def test_schema_refuses_bad_pod_metadata(chart: str, override: dict[str, Any], where: str) -> None:
    refused(chart, override, where)


# --- 7. the database from host, port, name, user and a password Secret --------------------

DB_PARTS = {
    "host": "pg.internal.example.org",
    "port": 6432,
    "name": "concord_prod",
    "user": "concord@pg-server",
    "passwordSecret": {"name": "concord-db-password", "key": "pw"},
    "parameters": {"sslmode": "verify-full", "application_name": "concord api"},
}
DB_URL = (
    "postgresql+psycopg://concord%40pg-server@pg.internal.example.org:6432/concord_prod"
    "?application_name=concord+api&sslmode=verify-full"
)


def db_parts(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    data = values("server", extra)
    data["database"] = {**{k: v for k, v in data["database"].items() if k != "url"}, **DB_PARTS}
    return data


def test_database_from_parts_composes_the_url_and_reads_the_password_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendered = render("server", db_parts())
    password = {"secretKeyRef": {"name": "concord-db-password", "key": "pw"}}
    for kind, suffix, name in (
        ("Deployment", "consortium-server", "api"),
        ("Deployment", "consortium-server", "wait-for-migrations"),
        ("Job", "-migrate", "migrate"),
    ):
        item = env(container(rendered, kind, suffix, name))
        assert item["CONCORD_DATABASE__URL"] == DB_URL, name
        # libpq reads PGPASSWORD when the URL has none: no escaping of the password.
        assert item["PGPASSWORD"] == password, name
    # No Secret of the chart's holds the URL (nor the migration hook's copy of it).
    names = {s["metadata"]["name"] for s in rendered.all("Secret")}
    assert not {"concord-consortium-server-database", "concord-consortium-server-migrate"} & names
    # The settings the server builds from this accept it in production, password-free.
    from consortium_server.settings import ServerSettings

    for key, value in api_settings(rendered).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CONCORD_DATABASE__URL", DB_URL)
    settings = ServerSettings()
    assert settings.database_url() == DB_URL
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url())
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "concord@pg-server",
        None,
        "pg.internal.example.org",
        6432,
        "concord_prod",
    )
    assert dict(url.query) == {"sslmode": "verify-full", "application_name": "concord api"}


def test_database_url_and_existing_secret_still_work() -> None:
    minimal = env(container(server(), "Deployment", "consortium-server", "api"))
    assert minimal["CONCORD_DATABASE__URL"] == {
        "secretKeyRef": {"name": "concord-consortium-server-database", "key": "database-url"}
    }
    assert "PGPASSWORD" not in minimal
    production = env(
        container(server(base=PROD["server"]), "Deployment", "consortium-server", "api")
    )
    assert production["CONCORD_DATABASE__URL"] == {
        "secretKeyRef": {"name": "concord-database", "key": "url"}
    }


@pytest.mark.parametrize(
    "database",
    [
        {"url": "postgresql+psycopg://a:b@h/d", "existingSecret": "db"},
        {"url": "postgresql+psycopg://a:b@h/d", "host": "h", "passwordSecret": {"name": "p"}},
        {"url": "", "host": "pg.example.org"},
        {"url": "", "host": "pg.example.org", "passwordSecret": {"name": ""}},
        {
            "url": "",
            "existingSecret": "db",
            "host": "pg.example.org",
            "passwordSecret": {"name": "p"},
        },
        {"url": "", "host": "pg.example.org", "port": "5432", "passwordSecret": {"name": "p"}},
        {"url": "", "host": "pg example", "passwordSecret": {"name": "p"}},
    ],
    ids=[
        "url-and-secret",
        "url-and-host",
        "host-without-password",
        "empty-password-secret",
        "secret-and-host",
        "port-as-string",
        "bad-host",
    ],
)
def test_schema_wants_exactly_one_way_to_the_database(database: dict[str, Any]) -> None:
    refused("server", {"database": database}, "/database")


# --- 8. externalTrafficPolicy of the SuperLink's public Service ---------------------------


def test_superlink_service_external_traffic_policy() -> None:
    local = server(
        {"superlink": {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}}}
    )
    assert local.get("Service", "superlink")["spec"]["externalTrafficPolicy"] == "Local"
    assert "externalTrafficPolicy" not in local.get("Service", "superlink-control")["spec"]
    node_port = server(
        {"superlink": {"service": {"type": "NodePort", "externalTrafficPolicy": "Cluster"}}}
    )
    assert node_port.get("Service", "superlink")["spec"]["externalTrafficPolicy"] == "Cluster"
    # ClusterIP takes none (the API server would refuse it).
    cluster_ip = server({"superlink": {"service": {"externalTrafficPolicy": "Local"}}})
    assert "externalTrafficPolicy" not in cluster_ip.get("Service", "superlink")["spec"]
    refused(
        "server",
        {"superlink": {"service": {"externalTrafficPolicy": "local"}}},
        "externalTrafficPolicy",
    )


# --- 9. the DNS egress rule ----------------------------------------------------------------


def _dns_rule(policy: dict[str, Any]) -> dict[str, Any]:
    return next(
        r for r in policy["spec"]["egress"] if {p["port"] for p in r["ports"]} <= {53, 5353}
    )


def test_server_dns_rule_defaults_to_any_destination_and_can_be_narrowed() -> None:
    default = server()
    for suffix in ("consortium-server", "superlink"):
        rule = _dns_rule(default.get("NetworkPolicy", suffix))
        assert "to" not in rule
        assert rule["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    openshift = {
        "namespace": "openshift-dns",
        "podSelector": {"dns.operator.openshift.io/daemonset-dns": "default"},
        "ports": [5353],
    }
    rendered = server({"networkPolicy": {"dns": openshift}})
    for suffix in ("consortium-server", "superlink"):
        rule = _dns_rule(rendered.get("NetworkPolicy", suffix))
        assert rule["to"] == [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}
                },
                "podSelector": {"matchLabels": openshift["podSelector"]},
            }
        ]
        assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {(5353, "UDP"), (5353, "TCP")}
    # Labels without a namespace: those pods in any namespace (not just the release's).
    anywhere = server({"networkPolicy": {"dns": {"podSelector": {"k8s-app": "kube-dns"}}}})
    [peer] = _dns_rule(anywhere.get("NetworkPolicy", "superlink"))["to"]
    assert peer == {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }


def test_site_dns_rule() -> None:
    [peer] = _dns_rule(site().get("NetworkPolicy"))["to"]
    assert peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    custom = site(
        {
            "networkPolicy": {
                "dns": {
                    "namespace": "dns",
                    "podSelector": {"k8s-app": None, "app": "coredns"},
                    "ports": [53, 5353],
                }
            }
        }
    )
    rule = _dns_rule(custom.get("NetworkPolicy"))
    # Helm merges maps: the default label goes only when set to null (as values.yaml says).
    assert rule["to"][0]["podSelector"] == {"matchLabels": {"app": "coredns"}}
    assert [p["port"] for p in rule["ports"]] == [53, 53, 5353, 5353]


@pytest.mark.parametrize(
    ("chart", "override", "where"),
    [
        ("server", {"networkPolicy": {"dns": {"ports": []}}}, "/networkPolicy/dns/ports"),
        ("server", {"networkPolicy": {"dns": {"ports": ["53"]}}}, "/networkPolicy/dns/ports/0"),
        (
            "site",
            {"networkPolicy": {"dns": {"podSelector": ["k8s-app"]}}},
            "/networkPolicy/dns/podSelector",
        ),
        ("site", {"networkPolicy": {"dnsNamespace": "kube-system"}}, "'dnsNamespace' not allowed"),
    ],
)
def test_schema_refuses_a_bad_dns_rule(chart: str, override: dict[str, Any], where: str) -> None:
    refused(chart, override, where)


# --- 10. helm test -------------------------------------------------------------------------


def _admits(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    """Does an ingress rule of ``policy`` admit a pod with ``labels`` (same namespace)?"""
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule.get("ports", [])]:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            selector = peer.get("podSelector", {}).get("matchLabels")
            if "namespaceSelector" not in peer and selector and selector.items() <= labels.items():
                return True
    return False


def test_server_helm_test_pod_is_admitted_by_the_api_network_policy() -> None:
    rendered = server(base=PROD["server"])  # apiIngressFrom narrows the API to ingress-nginx
    test_pod = rendered.get("Pod", "test-readyz")
    labels = test_pod["metadata"]["labels"]
    policy = rendered.get("NetworkPolicy", "consortium-server")
    assert _admits(policy, labels, 8600)
    assert not _admits(policy, {**labels, "app.kubernetes.io/component": "other"}, 8600)
    assert test_pod["metadata"]["annotations"][HOOK] == "test"
    assert test_pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert test_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # No test pod, no rule for it.
    without = server({"tests": {"enabled": False}}, base=PROD["server"])
    assert without.all("Pod") == []
    assert not _admits(without.get("NetworkPolicy", "consortium-server"), labels, 8600)


def test_site_helm_test_pod_checks_the_consortium_with_the_release_settings() -> None:
    rendered = site({"caBundle": {"certificates": PEM}, "imagePullSecrets": [{"name": "regcred"}]})
    test_pod = rendered.get("Pod", "test-consortium")
    assert test_pod["metadata"]["annotations"][HOOK] == "test"
    spec = test_pod["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["automountServiceAccountToken"] is False
    item = spec["containers"][0]
    assert [s["configMapRef"]["name"] for s in item["envFrom"]] == ["hospital-site-node-settings"]
    # The client secret is a file on the Secret's volume, in no environment variable.
    assert "CONCORD_SITE_CLIENT_SECRET" not in env(item)
    secret_file = env(item)["CONCORD_SITE_CLIENT_SECRET_FILE"]
    mount = {m["name"]: m for m in item["volumeMounts"]}["credentials"]
    assert secret_file.startswith(mount["mountPath"] + "/")
    assert volumes(test_pod)["credentials"]["secret"] == {
        "secretName": "hospital-site-node-credentials",
        "defaultMode": 0o440,
        "items": [{"key": "client-secret", "path": secret_file.rsplit("/", 1)[1]}],
    }
    assert env(item)["SSL_CERT_FILE"] == "/etc/concord/ca-bundle/ca-bundle.crt"
    assert [c["name"] for c in spec["initContainers"]] == ["install-ca-bundle"]
    # Read-only and light: no keys, state or data.
    assert set(volumes(test_pod)) == {"tmp", "credentials", "ca-bundle", "ca-bundle-extra"}
    # The site's NetworkPolicy selects it too: egress to DNS and the consortium only.
    selector = rendered.get("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= test_pod["metadata"]["labels"].items()
    # ...but the Deployment's ReplicaSets never adopt it (they also select pod-template-hash).
    assert test_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    assert site({"tests": {"enabled": False}}).all("Pod") == []
    refused("site", {"tests": {"enabled": "yes"}}, "/tests/enabled")


class _FakeConsortium(BaseHTTPRequestHandler):
    """Keycloak's token endpoint and the API's /api/v1/me, in one tiny HTTP server."""

    organisation = "Hospital A"
    roles: list[str] = ["site_node"]
    seen: list[str] = []

    def log_message(self, *_: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        form = self.rfile.read(length).decode()
        self.seen.append(f"POST {self.path} {form}")
        self._send(200, {"access_token": "token-1", "expires_in": 300, "token_type": "Bearer"})

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path} {self.headers.get('Authorization')}")
        if self.headers.get("Authorization") != "Bearer token-1":
            self._send(401, {"error": {"code": "auth.invalid_token", "message": "no"}})
            return
        body = {
            "subject": "service-account-site-hospital-a",
            "roles": self.roles,
            "organisation": self.organisation,
            "issuer": "http://keycloak/realms/consortium",
            "client_id": "site-hospital-a",
        }
        self._send(200, body)


@pytest.fixture
def fake_consortium() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeConsortium)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _FakeConsortium.seen = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        _FakeConsortium.organisation, _FakeConsortium.roles = "Hospital A", ["site_node"]


def _run_site_test_pod(url: str) -> subprocess.CompletedProcess[str]:
    """The test pod's command, with the env its ConfigMap and Secret give it."""
    rendered = site({"environment": "development", "consortium": {"apiUrl": url, "tokenUrl": url}})
    item = rendered.get("Pod", "test-consortium")["spec"]["containers"][0]
    process_env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
    }
    process_env.update(rendered.get("ConfigMap", "-settings")["data"])
    process_env["CONCORD_SITE_CLIENT_SECRET"] = "placeholder-client-secret"
    command = [sys.executable, *item["command"][1:]]
    assert item["command"][0] == "python"
    return subprocess.run(
        command, env=process_env, capture_output=True, text=True, timeout=60, check=False
    )


def test_site_helm_test_pod_passes_against_a_consortium_that_knows_the_site(
    fake_consortium: str,
) -> None:
    result = _run_site_test_pod(fake_consortium)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "client_credentials token" in result.stdout
    token_request, me = _FakeConsortium.seen
    assert token_request.startswith("POST /realms/consortium/protocol/openid-connect/token ")
    assert "client_id=site-hospital-a" in token_request
    assert "client_secret=placeholder-client-secret" in token_request
    assert me == "GET /api/v1/me Bearer token-1"
    # The wrong organisation, or a client without the site_node role, fails the test.
    _FakeConsortium.organisation = "Hospital B"
    assert _run_site_test_pod(fake_consortium).returncode != 0
    _FakeConsortium.organisation, _FakeConsortium.roles = "Hospital A", ["researcher"]
    failed = _run_site_test_pod(fake_consortium)
    assert failed.returncode != 0
    assert "site_node" in failed.stderr


# --- 11. the migration Job as a Helm hook ---------------------------------------------------


@pytest.mark.parametrize("base", ["server-minimal.yaml", "server-production.yaml"])
def test_migration_job_is_a_hook_with_a_stable_name(base: str) -> None:
    data = values("server", base=base)
    first = render_release("server", data, revision=1)
    later = render_release("server", data, revision=7, upgrade=True)
    for rendered in (first, later):
        job = rendered.get("Job")
        assert job["metadata"]["name"] == "concord-consortium-server-migrate"
        annotations = job["metadata"]["annotations"]
        assert annotations[HOOK] == "pre-install,pre-upgrade"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        assert int(annotations[WEIGHT]) == -5


def test_migration_job_reads_nothing_the_release_creates_after_it() -> None:
    """A pre-install hook runs before the release's objects exist: every ConfigMap, Secret
    and ServiceAccount the Job's pod names is a hook of lower weight, or not the chart's."""
    for base in ("server-minimal.yaml", "server-production.yaml"):
        rendered = server(base=base)
        job = rendered.get("Job")
        weight = int(job["metadata"]["annotations"][WEIGHT])
        spec = job["spec"]["template"]["spec"]
        named: set[tuple[str, str]] = {("ServiceAccount", spec["serviceAccountName"])}
        for item in spec["containers"] + spec.get("initContainers", []):
            assert "envFrom" not in item
            for variable in item.get("env", []):
                for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if ref in variable.get("valueFrom", {}):
                        named.add((kind, variable["valueFrom"][ref]["name"]))
        for volume in spec["volumes"]:
            if "secret" in volume:
                named.add(("Secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                named.add(("ConfigMap", volume["configMap"]["name"]))
        by_name = {(d["kind"], d["metadata"]["name"]): d for d in rendered.docs()}
        for key in named:
            if key in by_name:  # the chart's: it must be a hook created before the Job
                doc = by_name[key]
                assert is_hook(doc), (base, key)
                assert int(doc["metadata"]["annotations"][WEIGHT]) < weight, (base, key)
        # Its settings are the API's, rendered inline.
        item = spec["containers"][0]
        inline = {e["name"]: e["value"] for e in item["env"] if "value" in e}
        assert api_settings(rendered).items() <= inline.items()


def test_migration_hook_secret_and_account_follow_the_values() -> None:
    minimal = server()
    secret = minimal.get("Secret", "-migrate")
    assert is_hook(secret)
    assert secret["stringData"] == minimal.get("Secret", "-database")["stringData"]
    # Existing secrets (production): no copy; no chart ServiceAccount: none of the hook's either.
    assert [s for s in server(base=PROD["server"]).all("Secret") if is_hook(s)] == []
    own = server({"serviceAccount": {"create": False, "name": "concord"}})
    assert [a for a in own.all("ServiceAccount") if is_hook(a)] == []
    assert pod(own, "Job")["spec"]["serviceAccountName"] == "concord"
    assert server({"migrations": {"enabled": False}}).all("Job") == []
    # Only the Job's hooks and the test pod are hooks: the release's own objects are not.
    hooks = sorted((d["kind"], d["metadata"]["name"]) for d in minimal.docs() if is_hook(d))
    assert hooks == [
        ("Job", "concord-consortium-server-migrate"),
        ("Pod", "concord-consortium-server-test-readyz"),
        ("Secret", "concord-consortium-server-migrate"),
        ("ServiceAccount", "concord-consortium-server-migrate"),
    ]


# --- 12. checksum annotations ----------------------------------------------------------------


def test_server_pods_roll_when_anything_they_read_changes() -> None:
    base = values(
        "server",
        {
            "policies": {
                "schema": "namespace Concord {}",
                "consortium": {"a.cedar": "permit(principal, action, resource);"},
            }
        },
    )
    rendered = render("server", base)
    api = pod(rendered, "Deployment", "consortium-server")["metadata"]["annotations"]
    expected = {
        "checksum/settings": "configmap.yaml",
        "checksum/policies": "policies-configmap.yaml",
        "checksum/ca-bundle": "ca-bundle-configmap.yaml",
        "checksum/database": "secret-database.yaml",
        "checksum/audit-key": "secret-audit-key.yaml",
        "checksum/federation-token": "secret-federation-token.yaml",
        "checksum/superlink-tls": "secret-superlink-tls.yaml",
        "checksum/control-client-tls": "secret-control-client-tls.yaml",
    }
    for annotation, template in expected.items():
        assert api[annotation] == sha256(rendered, "server", template), annotation
    link = pod(rendered, "Deployment", "superlink")["metadata"]["annotations"]
    assert {k for k in link if k.startswith("checksum/")} == {
        "checksum/federation-token",
        "checksum/superlink-tls",
    }
    # One change, one checksum moves (the token is pinned: it is random otherwise).
    token = {"federation": {"token": "t" * 40}}
    before = pod(render("server", merge(base, token)), "Deployment", "consortium-server")
    for override, moved in (
        (
            {
                "audit": {
                    "headKey": "-----BEGIN PRIVATE KEY-----\nother\n-----END PRIVATE KEY-----\n"
                }
            },
            "checksum/audit-key",
        ),
        (
            {"database": {"url": "postgresql+psycopg://concord:other@db:5432/concord"}},
            "checksum/database",
        ),
        (
            {"policies": {"consortium": {"a.cedar": "forbid(principal, action, resource);"}}},
            "checksum/policies",
        ),
        ({"caBundle": {"certificates": PEM}}, "checksum/ca-bundle"),
    ):
        after = pod(
            render("server", merge(merge(base, token), override)), "Deployment", "consortium-server"
        )
        changed = {
            k
            for k, v in after["metadata"]["annotations"].items()
            if k.startswith("checksum/") and before["metadata"]["annotations"][k] != v
        }
        assert moved in changed, override
        assert changed <= {moved, "checksum/settings"}, (override, changed)


def test_existing_objects_are_checksummed_by_lookup() -> None:
    """With existing Secrets/ConfigMaps the checksum is of their data as lookup finds it
    (nothing without a cluster: the checksum of `{}`)."""
    empty = hashlib.sha256(b"{}").hexdigest()
    production = pod(
        server({"caBundle": {"existingConfigMap": "corp-ca"}}, base=PROD["server"]),
        "Deployment",
        "consortium-server",
    )
    for annotation in (
        "checksum/database",
        "checksum/audit-key",
        "checksum/ca-bundle",
        "checksum/federation-token",
    ):
        assert production["metadata"]["annotations"][annotation] == empty, annotation
    parts = pod(render("server", db_parts()), "Deployment", "consortium-server")
    assert parts["metadata"]["annotations"]["checksum/database"] == empty
    site_prod = pod(site(base=PROD["site"]), "Deployment")["metadata"]["annotations"]
    for annotation in ("checksum/consortium-ca", "checksum/credentials", "checksum/site-keys"):
        assert site_prod[annotation] == empty, annotation


def test_site_pod_rolls_when_anything_it_reads_changes() -> None:
    rendered = site({"caBundle": {"certificates": PEM}})
    annotations = pod(rendered, "Deployment")["metadata"]["annotations"]
    for annotation, template in {
        "checksum/settings": "configmap.yaml",
        "checksum/site": "site-configmap.yaml",
        "checksum/ca-bundle": "ca-bundle-configmap.yaml",
        "checksum/consortium-ca": "ca-configmap.yaml",
        "checksum/credentials": "secret-credentials.yaml",
    }.items():
        assert annotations[annotation] == sha256(rendered, "site", template), annotation
    assert len(annotations["checksum/site-keys"]) == 64  # your Secret, by lookup
    other_secret = pod(
        site({"caBundle": {"certificates": PEM}, "credentials": {"clientSecret": "other"}}),
        "Deployment",
    )
    assert (
        other_secret["metadata"]["annotations"]["checksum/credentials"]
        != annotations["checksum/credentials"]
    )
    other_ca = pod(
        site({"caBundle": {"certificates": PEM}, "consortium": {"caCertificate": PEM}}),
        "Deployment",
    )
    assert (
        other_ca["metadata"]["annotations"]["checksum/consortium-ca"]
        != annotations["checksum/consortium-ca"]
    )


# --- 13. publishing policies on upgrade ----------------------------------------------------


def test_notes_say_how_to_publish_changed_policies() -> None:
    data = values("server", base=PROD["server"])
    installed = render_release("server", data, revision=1)
    upgraded = render_release("server", data, revision=4, upgrade=True)
    for rendered in (installed, upgraded):
        notes = rendered.notes
        assert "do NOT reach the database by themselves" in notes
        assert "policy publish policies" in notes
        get = "kubectl -n concord get configmap concord-consortium-server-policies -o go-template="
        assert (
            get + "'{{index .data \"schema.cedarschema\"}}' > policies/schema.cedarschema" in notes
        )
        assert (
            get
            + "'{{index .data \"consortium.privacy.cedar\"}}' > policies/consortium/privacy.cedar"
        ) in notes
    assert "this was an upgrade" in upgraded.notes
    assert "this was an upgrade" not in installed.notes
    assert "policy publish <directory" in server().notes  # the image's policies
    text = (CHART_OF["server"] / "values.yaml").read_text()
    assert "publish it with `consortium policy publish`" in text


# --- 14. probes --------------------------------------------------------------------------


@pytest.mark.parametrize("chart", ["server", "site"])
def test_every_long_running_container_has_probes(chart: str) -> None:
    rendered = render(chart, values(chart, base=PROD[chart]))
    for deployment in rendered.all("Deployment"):
        for item in deployment["spec"]["template"]["spec"]["containers"]:
            where = f"{deployment['metadata']['name']}/{item['name']}"
            assert "livenessProbe" in item, where
            assert "readinessProbe" in item, where
            assert "startupProbe" in item, where
    supernode = container(site(), "Deployment", "", "supernode")
    assert supernode["readinessProbe"]["grpc"]["port"] == 9096


def _agent_probe(state_dir: Path) -> subprocess.CompletedProcess[str]:
    rendered = site()
    agent = container(rendered, "Deployment", "", "agent")
    command = agent["livenessProbe"]["exec"]["command"]
    assert command == agent["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["site-node", "agent-health"]
    process_env = dict(os.environ)
    process_env.update(rendered.get("ConfigMap", "-settings")["data"])
    process_env["CONCORD_SITE_STATE_DIR"] = str(state_dir)
    process_env["CONCORD_SITE_CLIENT_SECRET"] = "from-the-secret"
    binary = Path(sys.executable).parent / "site-node"
    return subprocess.run(
        [str(binary), *command[1:]], env=process_env, capture_output=True, text=True, check=False
    )


def test_agent_probe_checks_the_agents_heartbeat(tmp_path: Path) -> None:
    from site_node.agent.heartbeat import HEARTBEAT_FILE, beat

    # Before the first pass: not ready (and not live: the startup probe allows for it).
    missing = _agent_probe(tmp_path)
    assert missing.returncode == 1
    assert "has not finished a pass" in missing.stderr
    beat(tmp_path)
    assert _agent_probe(tmp_path).returncode == 0
    # A pass that finished too long ago (a hung loop): the probe fails, the pod restarts.
    (tmp_path / HEARTBEAT_FILE).write_text(f"{time.time() - 3600:.3f}\n")
    stale = _agent_probe(tmp_path)
    assert stale.returncode == 1
    assert "last pass finished" in stale.stderr


# --- 15. the Ingress's body size --------------------------------------------------------------

BODY = "nginx.ingress.kubernetes.io/proxy-body-size"


def test_ingress_lets_uploads_of_the_api_through() -> None:
    rendered = server(base=PROD["server"])
    annotations = rendered.get("Ingress")["metadata"]["annotations"]
    assert annotations[BODY] == "64m"
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    settings = api_settings(rendered)
    from consortium_server.settings import ApiSettings

    assert settings["CONCORD_API__MAX_KEY_BODY_BYTES"] == str(64 * 1024 * 1024)
    assert int(settings["CONCORD_API__MAX_KEY_BODY_BYTES"]) == ApiSettings().max_key_body_bytes
    assert int(settings["CONCORD_API__MAX_BODY_BYTES"]) == ApiSettings().max_body_bytes
    # An annotation of the user's wins; "" renders none; "0" is nginx's "no limit".
    own = server({"ingress": {"annotations": {BODY: "1g"}}}, base=PROD["server"])
    assert own.get("Ingress")["metadata"]["annotations"][BODY] == "1g"
    none = server({"ingress": {"proxyBodySize": ""}}, base=PROD["server"])
    assert BODY not in none.get("Ingress")["metadata"]["annotations"]
    unlimited = server({"ingress": {"proxyBodySize": "0"}}, base=PROD["server"])
    assert unlimited.get("Ingress")["metadata"]["annotations"][BODY] == "0"
    bigger = server(
        {"server": {"maxKeyBodyBytes": 256 * 1024 * 1024}, "ingress": {"proxyBodySize": "256M"}},
        base=PROD["server"],
    )
    assert api_settings(bigger)["CONCORD_API__MAX_KEY_BODY_BYTES"] == str(256 * 1024 * 1024)


@pytest.mark.parametrize(
    "override",
    [
        {"ingress": {"proxyBodySize": "1m"}},
        {"ingress": {"annotations": {BODY: "10m"}}},
        {"server": {"maxKeyBodyBytes": 128 * 1024 * 1024}},
    ],
    ids=["proxy-body-size", "annotation", "max-key-body"],
)
def test_ingress_body_size_below_the_api_limit_fails(override: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="below the largest body the API accepts"):
        server(override, base=PROD["server"])


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ({"ingress": {"proxyBodySize": "64MB"}}, "/ingress/proxyBodySize"),
        ({"ingress": {"proxyBodySize": 64}}, "/ingress/proxyBodySize"),
        ({"server": {"maxKeyBodyBytes": "64Mi"}}, "/server/maxKeyBodyBytes"),
    ],
)
def test_schema_refuses_bad_body_sizes(override: dict[str, Any], where: str) -> None:
    refused("server", override, where)


# --- already there: the extra CA bundle, the pinned head key, the SuperNode's ports --------


@pytest.mark.parametrize(
    ("chart", "outbound"),
    [("server", {"consortium-server": ["api"]}), ("site", {"site-node": ["agent", "supernode"]})],
)
def test_ca_bundle_from_values(chart: str, outbound: dict[str, list[str]]) -> None:
    rendered = render(chart, values(chart, {"caBundle": {"certificates": PEM}}))
    [config] = [
        c for c in rendered.all("ConfigMap") if c["metadata"]["name"].endswith("-ca-bundle")
    ]
    assert config["data"] == {"ca-bundle.crt": PEM}
    for suffix, names in outbound.items():
        template = pod(rendered, "Deployment", suffix)
        init = containers(template)["install-ca-bundle"]
        assert init["command"][-1].endswith("> /etc/concord/ca-bundle/ca-bundle.crt")
        assert "/etc/ssl/certs/ca-certificates.crt" in init["command"][-1]
        assert (
            volumes(template)["ca-bundle-extra"]["configMap"]["name"] == config["metadata"]["name"]
        )
        assert volumes(template)["ca-bundle"]["emptyDir"]["medium"] == "Memory"
        for name in names:
            item = containers(template)[name]
            assert env(item)["SSL_CERT_FILE"] == env(item)["REQUESTS_CA_BUNDLE"]
            assert env(item)["SSL_CERT_FILE"].startswith(
                mounts(item)["/etc/concord/ca-bundle"]["mountPath"]
            )
            assert mounts(item)["/etc/concord/ca-bundle"]["readOnly"] is True
    # Unset: nothing of it anywhere.
    plain = render(chart, values(chart))
    assert not [c for c in plain.all("ConfigMap") if c["metadata"]["name"].endswith("-ca-bundle")]
    for _, spec in pod_specs(plain):
        for item in spec.get("initContainers", []) + spec["containers"]:
            assert item["name"] != "install-ca-bundle"
            assert "SSL_CERT_FILE" not in env(item)


@pytest.mark.parametrize("chart", ["server", "site"])
def test_ca_bundle_from_an_existing_config_map(chart: str) -> None:
    override = {"caBundle": {"existingConfigMap": "corp-ca", "existingConfigMapKey": "bundle.pem"}}
    rendered = render(chart, values(chart, override))
    assert not [
        c for c in rendered.all("ConfigMap") if c["metadata"]["name"].endswith("-ca-bundle")
    ]
    template = pod(rendered, "Deployment", "consortium-server" if chart == "server" else "")
    source = volumes(template)["ca-bundle-extra"]["configMap"]
    assert source == {"name": "corp-ca", "items": [{"key": "bundle.pem", "path": "ca-bundle.crt"}]}
    both = values(chart, {"caBundle": {"certificates": PEM, "existingConfigMap": "corp-ca"}})
    with pytest.raises(
        helm_python.HelmRenderError, match="set certificates or existingConfigMap, not both"
    ):
        render(chart, both)
    refused(chart, {"caBundle": {"certificates": "not a certificate"}}, "/caBundle/certificates")
    refused(chart, {"caBundle": {"existingConfigMapKey": "a/b"}}, "/caBundle/existingConfigMapKey")


def test_site_pins_the_audit_head_key(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = site({"consortium": {"auditHeadKey": HEAD_KEY}})
    data = rendered.get("ConfigMap", "-settings")["data"]
    assert data["CONCORD_SITE_SERVER_HEAD_KEY"] == HEAD_KEY
    from site_node.settings import SiteSettings

    for key, value in data.items():
        monkeypatch.setenv(key, value)
    assert SiteSettings().server_head_key == HEAD_KEY
    # Production refuses to render without it (no trust on first use); development may.
    with pytest.raises(helm_python.HelmRenderError, match="auditHeadKey is required"):
        site({"consortium": {"auditHeadKey": ""}})
    development = site({"environment": "development", "consortium": {"auditHeadKey": ""}})
    assert "CONCORD_SITE_SERVER_HEAD_KEY" not in development.get("ConfigMap", "-settings")["data"]
    refused("site", {"consortium": {"auditHeadKey": "not-base64"}}, "/consortium/auditHeadKey")
    refused("site", {"consortium": {"auditHeadKey": 44}}, "/consortium/auditHeadKey")


def test_supernode_runtime_port_and_node_config() -> None:
    from flwr.common.config import parse_config_args

    rendered = site({"supernode": {"runtimePort": 9190, "nodeConfig": {"max-threads": 2}}})
    args = container(rendered, "Deployment", "", "supernode")["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "9190"
    node_config = parse_config_args([args[args.index("--node-config") + 1]])
    settings = rendered.get("ConfigMap", "-settings")["data"]
    assert node_config == {
        "site-id": "hospital-a",
        "state-dir": settings["CONCORD_SITE_STATE_DIR"],
        "datasets-file": settings["CONCORD_SITE_DATASETS_FILE"],
        "max-threads": 2,
    }
    supernode = container(rendered, "Deployment", "", "supernode")
    assert mounts(supernode)[settings["CONCORD_SITE_STATE_DIR"]]["name"] == "state"
    datasets_dir = settings["CONCORD_SITE_DATASETS_FILE"].rsplit("/", 1)[0]
    assert mounts(supernode)[datasets_dir]["name"] == "site-files"
    refused("site", {"supernode": {"runtimePort": "9190"}}, "/supernode/runtimePort")
    refused("site", {"supernode": {"nodeConfig": {"state-dir": "/tmp"}}}, "'state-dir'")
    refused("site", {"supernode": {"nodeConfig": {"datasets-file": "x"}}}, "'datasets-file'")


def test_supernode_dp_max_physical_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """supernode.dpMaxPhysicalBatch reaches the ClientApps' settings; unset by default (each
    DP-SGD batch in one pass)."""
    from site_node.settings import SiteSettings

    assert "CONCORD_SITE_DP_MAX_PHYSICAL_BATCH" not in site().get("ConfigMap", "-settings")["data"]
    rendered = site({"supernode": {"dpMaxPhysicalBatch": 16}})
    data = rendered.get("ConfigMap", "-settings")["data"]
    assert data["CONCORD_SITE_DP_MAX_PHYSICAL_BATCH"] == "16"
    monkeypatch.setenv(
        "CONCORD_SITE_DP_MAX_PHYSICAL_BATCH", data["CONCORD_SITE_DP_MAX_PHYSICAL_BATCH"]
    )
    assert SiteSettings().dp_max_physical_batch == 16
    refused("site", {"supernode": {"dpMaxPhysicalBatch": 0}}, "/supernode/dpMaxPhysicalBatch")
    refused("site", {"supernode": {"dpMaxPhysicalBatch": "16"}}, "/supernode/dpMaxPhysicalBatch")


def test_production_values_exercise_the_new_settings() -> None:
    """The production-like values files use some of the new settings, so that the strict
    Kubernetes validation in test_charts.py covers them too."""
    server_prod = server(base=PROD["server"])
    assert server_prod.get("Service", "superlink")["spec"]["externalTrafficPolicy"] == "Local"
    site_prod = pod(site(base=PROD["site"]), "Deployment")
    assert containers(site_prod)["supernode"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert site_prod["spec"]["runtimeClassName"] == "nvidia"
    settings = site(base=PROD["site"]).get("ConfigMap", "-settings")["data"]
    assert settings["CONCORD_SITE_DP_MAX_PHYSICAL_BATCH"] == "64"


def api_settings(rendered: Rendered) -> dict[str, str]:
    """The API's settings: the data of the server chart's -settings ConfigMap."""
    return dict(rendered.get("ConfigMap", "-settings")["data"])
