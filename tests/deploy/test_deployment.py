"""The Helm deployment trains: a whole study on the rendered charts, on PostgreSQL.

The consortium-server chart and three site-node charts are rendered with the production
values in ``tests/deploy/values/e2e/`` and every rendered workload runs here as **real
processes from the installed package** (this venv stands in for the images' /opt/concord),
started from the rendered manifests alone (:mod:`tests.deploy.cluster`: command, args and
env of each container; its ConfigMaps and Secrets as files at their mount paths; its
volumes as directories, one per PersistentVolumeClaim; every pod's ports on loopback ports
of its own; Services as loopback ports, round robin over the API's two replicas). What the
test supplies is what an operator, a hospital's IT team and a cluster do, never a flag, path
or variable of a container:

- the Secrets and ConfigMaps the values name as ``existingSecret`` / ``existingConfigMap``
  (database URL, audit key, TLS material, federation token, site keys, client secrets, CAs);
- values known only at run time: the ports of Keycloak (the Keycloak-shaped
  ``oidc-provider``, over HTTPS), of the Ingress (a TLS-terminating proxy in front of the API
  Service) and of the SuperLink's Fleet port, each hospital's egress proxy (an HTTP CONNECT
  proxy, the only way a site resolves and reaches the consortium's public names), and the
  operator's audit-head public key;
- hospital C's values ask for a GPU (``nvidia.com/gpu``, ``runtimeClassName``); there is no
  GPU here, so its pod runs the same code on the CPU, as it would on a node without one;
- what people do: hospital IT creates keys (``site-node keys init``) and sends the
  enrolment, the operator enrols (``consortium site enrol``), stewards publish their
  datasets and approve in the agent's container (``site-node ... `` as with ``kubectl
  exec``), IT teams pin each other's fingerprints, the researcher submits and starts the
  study and releases the model through the API, the compliance officer verifies the audit
  log (``consortium audit verify --server-key --site-keys``, the site keys exported by a
  hospital that pinned every peer);
- a failure: one of the two API replicas is killed once round 1 runs, and the study
  completes through the other (high availability with what the chart declares).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.deploy.charts import VALUES, merge, render
from tests.deploy.cluster import (
    BIN,
    IMAGE_ENV,
    CertificateAuthority,
    Cluster,
    ConnectProxy,
    Pod,
    TcpProxy,
    ed25519_pem,
)
from tests.support.drills import wait_for
from tests.support.oidc_provider import OidcClient, OidcProvider, running_oidc_provider

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

E2E = VALUES / "e2e"
SITES = ("a", "b", "c")
RESEARCHER_ORG = "University of Leiden"
#: The consortium's public names, as the operator sends them to the hospitals.
PUBLIC_NAMES = (
    "concord.consortium.example",
    "keycloak.consortium.example",
    "fl.consortium.example",
)


# --- what the operator and the hospitals have ---------------------------------------------


def e2e_values(name: str) -> dict[str, Any]:
    data = yaml.safe_load((E2E / name).read_text())
    assert isinstance(data, dict)
    return data


def realm_clients() -> list[OidcClient]:
    """The realm: operator, researcher, compliance officer; per hospital its site node's
    service account and its data steward."""
    clients = [
        OidcClient("concord-operator", uuid.uuid4().hex, ["consortium_admin"], "Consortium office"),
        OidcClient("researcher-cli", uuid.uuid4().hex, ["researcher"], RESEARCHER_ORG),
        OidcClient("compliance", uuid.uuid4().hex, ["compliance_officer"], "Consortium office"),
    ]
    for x in SITES:
        organisation = f"Hospital {x.upper()}"
        clients.append(
            OidcClient(f"site-hospital-{x}", uuid.uuid4().hex, ["site_node"], organisation)
        )
        clients.append(
            OidcClient(f"steward-hospital-{x}", uuid.uuid4().hex, ["data_steward"], organisation)
        )
    return clients


def token(provider: OidcProvider, client_id: str, ca_file: Path) -> str:
    """An access token by client credentials, as every Keycloak client gets one."""
    client = provider.clients[client_id]
    response = httpx.post(
        f"{provider.server_url}/realms/{provider.realm}/protocol/openid-connect/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
        verify=ssl.create_default_context(cafile=str(ca_file)),
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def write_site_data(directory: Path, index: int) -> None:
    """One third of scikit-learn's breast-cancer data as the hospital's CSV export."""
    from sklearn.datasets import load_breast_cancer

    from site_node.data.reference import WDBC_FEATURE_RANGES, write_ranges_file

    data = load_breast_cancer()
    rows = [i for i in range(len(data.target)) if i % len(SITES) == index]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "biopsies.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["record_id", *data.feature_names, "diagnosis"])
        for i in rows:
            writer.writerow([f"r{i}", *data.data[i], data.target_names[data.target[i]]])
    # The hospital's data dictionary: each feature's declared range (here the ranges
    # published with the WDBC data set), never computed from the records.
    write_ranges_file(directory / "biopsies-ranges.csv", WDBC_FEATURE_RANGES)


def governance(dataset_id: str, site_id: str, organisation: str) -> dict[str, Any]:
    return {
        "id": dataset_id,
        "site_id": site_id,
        "title": f"Breast-mass biopsies ({organisation})",
        "description": "Wisconsin diagnostic features from fine-needle aspirates.",
        "allowed_purposes": ["diagnostic_research"],
        "epsilon_budget": 20.0,
        "delta_budget": 1e-4,
        "max_epsilon_per_study": 8.0,
        "requires_encryption": True,
        "controller": f"{organisation} University Medical Centre",
        "data_categories": ["health data"],
        "legal_basis": "GDPR Art. 9(2)(j)",
        "retention": "10 years",
    }


def ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


class Cli:
    """``consortium`` on a user's machine: the public URL and a token of theirs."""

    def __init__(self, api_url: str, ca_file: Path, home: Path) -> None:
        self.api_url = api_url
        self.ca_file = ca_file
        self.home = home
        home.mkdir(parents=True, exist_ok=True)

    def __call__(self, bearer: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            **IMAGE_ENV,
            "HOME": str(self.home),
            "PATH": f"{BIN}:/usr/bin:/bin",
            "CONCORD_API_URL": self.api_url,
            "CONCORD_TOKEN": bearer,
            "SSL_CERT_FILE": str(self.ca_file),
        }
        return subprocess.run(
            [str(BIN / "consortium"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


class Api:
    """The researcher's and compliance officer's HTTPS client (the public URL)."""

    def __init__(self, url: str, ca_file: Path, bearer: str) -> None:
        self.http = httpx.Client(
            base_url=url,
            verify=ssl.create_default_context(cafile=str(ca_file)),
            headers={"Authorization": f"Bearer {bearer}"},
            timeout=60,
        )

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code < 400, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json() if "json" in response.headers.get("content-type", "") else response


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    # A short root: the site's warm-runner socket lives under it (108-byte socket paths).
    # Outside /tmp: every pod mounts a /tmp of its own over it.
    root = Path(tempfile.mkdtemp(prefix="concord-e2e-", dir="/var/tmp"))
    running = Cluster(root)
    try:
        yield running
    finally:
        running.stop()
        logs = sorted(root.glob("logs/*.log"))
        if os.environ.get("CONCORD_KEEP_E2E"):
            print(f"e2e state kept in {root}")
        else:
            for log in logs:  # shown by pytest on failure only (captured output)
                print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}")
            shutil.rmtree(root, ignore_errors=True)


def start(pod: Pod, container: str, cluster: Cluster) -> subprocess.Popen[bytes]:
    logs = cluster.root / "logs"
    logs.mkdir(exist_ok=True)
    return pod.start(container, logs / f"{pod.name}-{container}.log")


def log_of(pod: Pod, container: str, cluster: Cluster) -> str:
    return (cluster.root / "logs" / f"{pod.name}-{container}.log").read_text(errors="replace")


# --- the test ------------------------------------------------------------------------------


def test_a_study_trains_and_releases_on_the_rendered_charts(
    postgres_url: str, cluster: Cluster, tmp_path: Path
) -> None:
    web_ca = CertificateAuthority("hospital web CA")  # Keycloak's and the Ingress's issuer
    federation_ca = CertificateAuthority("consortium federation CA")  # SuperLink, Control
    ca_file = tmp_path / "web-ca.pem"
    ca_file.write_text(web_ca.pem)
    keycloak_cert, keycloak_key = web_ca.issue("keycloak.consortium.example")
    (tmp_path / "keycloak.crt").write_text(keycloak_cert)
    (tmp_path / "keycloak.key").write_text(keycloak_key)

    with running_oidc_provider(
        realm_clients(),
        work_dir=tmp_path / "keycloak",
        access_token_ttl=3600,
        tls=(tmp_path / "keycloak.crt", tmp_path / "keycloak.key"),
    ) as keycloak:
        assert keycloak.server_url.startswith("https://")
        run_study(keycloak, cluster, postgres_url, web_ca, federation_ca, ca_file, tmp_path)


def run_study(
    keycloak: OidcProvider,
    cluster: Cluster,
    postgres_url: str,
    web_ca: CertificateAuthority,
    federation_ca: CertificateAuthority,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    # --- the operator: Secrets, then `helm install` of the server chart --------------------
    head_key_pem = ed25519_pem()
    head_key = serialization.load_pem_private_key(head_key_pem.encode(), password=None)
    assert isinstance(head_key, Ed25519PrivateKey)
    head_public = base64.b64encode(
        head_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    ).decode()
    link_cert, link_key = federation_ca.issue("fl.consortium.example")
    client_cert, client_key = federation_ca.issue("concord API", client=True)
    server_secrets = {
        "concord-database": {"url": postgres_url},
        "concord-audit-key": {"audit-head-key.pem": head_key_pem},
        "concord-superlink-tls": {
            "tls.crt": link_cert,
            "tls.key": link_key,
            "ca.crt": federation_ca.pem,
        },
        "concord-control-client-tls": {"tls.crt": client_cert, "tls.key": client_key},
        "concord-federation": {"token": uuid.uuid4().hex + uuid.uuid4().hex},
        "consortium-web-ca": {"ca-bundle.crt": web_ca.pem},
    }
    ingress_cert, ingress_key = web_ca.issue("concord.consortium.example")
    (tmp_path / "ingress.crt").write_text(ingress_cert)
    (tmp_path / "ingress.key").write_text(ingress_key)
    ingress_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ingress_tls.load_cert_chain(tmp_path / "ingress.crt", tmp_path / "ingress.key")
    ingress = TcpProxy([], tls=ingress_tls)  # its backend: the API Service, below
    cluster.proxies.append(ingress)
    public_url = f"https://127.0.0.1:{ingress.port}"

    values = merge(
        e2e_values("server.yaml"),
        {"identity": {"keycloakUrl": keycloak.server_url}, "server": {"publicUrl": public_url}},
    )
    server = render("server", values, release="concord")
    api_deployment = server.get("Deployment", "consortium-server")
    replicas = int(api_deployment["spec"]["replicas"])
    assert replicas == 2
    migrate = cluster.pod(server, "Job", "", "migrate", server_secrets)
    apis = [
        cluster.pod(server, "Deployment", "consortium-server", f"api-{i}", server_secrets)
        for i in range(replicas)
    ]
    link = cluster.pod(server, "Deployment", "superlink", "superlink", server_secrets)
    cluster.expose(server)
    api_service = server.get("Service", "consortium-server")
    ingress.backends.append(
        cluster.services[
            f"{api_service['metadata']['name']}.concord.svc:{api_service['spec']['ports'][0]['port']}"
        ]
    )

    # The migration hook, then the pods (the API's init containers wait for the schema).
    migrate.run_init_containers()
    ok(migrate.run(migrate.spec["containers"][0]["name"]), "the migration Job")
    start(link, "superlink", cluster)
    wait_for(
        "the SuperLink's Fleet port",
        lambda: _listening(link.port("fleet")),
        timeout=90,
    )
    for api in apis:
        api.run_init_containers()
        start(api, "api", cluster)
    for api in apis:
        probe = api.container("api")["readinessProbe"]["httpGet"]["path"]
        wait_for(
            f"{api.name} {probe}",
            lambda api=api, probe=probe: _ready(api.port("http"), probe),
            timeout=120,
        )
    cli = Cli(public_url, ca_file, tmp_path / "home")
    operator = token(keycloak, "concord-operator", ca_file)
    researcher = Api(public_url, ca_file, token(keycloak, "researcher-cli", ca_file))
    compliance_token = token(keycloak, "compliance", ca_file)

    # --- each hospital: keys, enrolment, `helm install` of its site chart -------------------
    sites: dict[str, Pod] = {}
    proxies: dict[str, ConnectProxy] = {}
    for index, x in enumerate(SITES):
        site_id, organisation = f"hospital-{x}", f"Hospital {x.upper()}"
        keys = tmp_path / f"keys-{x}"
        init = subprocess.run(
            [str(BIN / "site-node"), "keys", "init", "--dir", str(keys)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        ok(init, "site-node keys init")
        enrolment = subprocess.run(
            [
                str(BIN / "site-node"),
                "keys",
                "enrolment",
                "--site-id",
                site_id,
                "--organisation",
                organisation,
                "--contact",
                f"it@{site_id}.example",
                "--dir",
                str(keys),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        (tmp_path / f"enrol-{x}.yaml").write_text(ok(enrolment, "site-node keys enrolment"))
        enrolled = ok(cli(operator, "site", "enrol", str(tmp_path / f"enrol-{x}.yaml")), "enrol")
        # The chart's API registered the SuperNode key through the SuperLink's Control API.
        assert "registered with the SuperLink" in enrolled, enrolled

        data = tmp_path / f"data-{x}"
        write_site_data(data, index)
        # The hospital reaches the consortium only through its egress proxy, which alone
        # resolves the consortium's public names (here: to the loopback ports above).
        proxy = ConnectProxy(dict.fromkeys(PUBLIC_NAMES, "127.0.0.1"))
        cluster.proxies.append(proxy)
        proxies[x] = proxy
        site_values = merge(
            e2e_values(f"site-{x}.yaml"),
            {
                "consortium": {
                    "apiUrl": f"https://concord.consortium.example:{ingress.port}",
                    "tokenUrl": f"https://keycloak.consortium.example:{keycloak.port}",
                    "superlinkAddress": f"fl.consortium.example:{link.port('fleet')}",
                    "auditHeadKey": head_public,
                },
                "proxy": {"httpProxy": proxy.url, "httpsProxy": proxy.url},
            },
        )
        external = {
            f"{site_id}-site-keys": {
                name: (keys / name).read_text()
                for name in ("signing_key.pem", "exchange_key.pem", "supernode")
            },
            f"{site_id}-oidc": {"secret": keycloak.clients[f"site-{site_id}"].client_secret},
            "consortium-ca": {"ca.crt": federation_ca.pem},
            "consortium-web-ca": {"ca-bundle.crt": web_ca.pem},
        }
        rendered = render("site", site_values, release=site_id)
        pod = cluster.pod(
            rendered, "Deployment", "", f"site-{x}", external, {"hospital-data": data}
        )
        pod.run_init_containers()
        start(pod, "supernode", cluster)
        start(pod, "agent", cluster)
        sites[x] = pod

    for x, pod in sites.items():
        wait_for(
            f"hospital-{x}'s SuperNode to connect",
            lambda pod=pod: (
                "SuperNode ID" in log_of(pod, "supernode", cluster) or _dead(pod, cluster)
            ),
            timeout=180,
        )
        assert not _dead(pod, cluster), log_of(pod, "supernode", cluster)

    # The agent containers' own probes pass (the rendered exec command, in the container).
    for x, pod in sites.items():
        probe = pod.container("agent")["livenessProbe"]["exec"]["command"]
        wait_for(
            f"hospital-{x}'s agent probe",
            lambda pod=pod, probe=probe: pod.run("agent", args=probe).returncode == 0,
            timeout=120,
            interval=2,
        )

    # --- stewards publish their datasets; IT teams pin each other ---------------------------
    fingerprints = {}
    for x, pod in sites.items():
        site_id, organisation = f"hospital-{x}", f"Hospital {x.upper()}"
        # The steward's governance file, copied into the pod (`kubectl cp` to its /tmp).
        gov = pod.host_path("/tmp") / "governance.yaml"
        gov.write_text(yaml.safe_dump(governance(f"biopsies-{site_id}", site_id, organisation)))
        entry = ok(
            pod.run(
                "agent",
                args=[
                    "site-node",
                    "data",
                    "catalogue-entry",
                    f"biopsies-{site_id}",
                    "--governance",
                    str(gov),
                ],
            ),
            "site-node data catalogue-entry",
        )
        (tmp_path / f"entry-{x}.yaml").write_text(entry)
        steward = token(keycloak, f"steward-{site_id}", ca_file)
        ok(cli(steward, "catalogue", "publish", str(tmp_path / f"entry-{x}.yaml")), "publish")
        fingerprints[site_id] = ok(
            pod.run("agent", args=["site-node", "keys", "fingerprint"]), "fingerprint"
        ).strip()
    for x, pod in sites.items():
        for peer, fingerprint in fingerprints.items():
            if peer != f"hospital-{x}":
                ok(
                    pod.run("agent", args=["site-node", "peers", "pin", peer, fingerprint]),
                    f"hospital-{x} pins {peer}",
                )
    # The compliance officer's site keys: from a hospital whose IT pinned every peer.
    site_keys_file = tmp_path / "site-keys.json"
    site_keys_file.write_text(
        ok(sites[SITES[0]].run("agent", args=["site-node", "peers", "export-keys"]), "export-keys")
    )

    # --- the researcher submits; every steward approves at their site ----------------------
    contract = {
        "title": "Malignancy from fine-needle aspirate features (deployment test)",
        "description": "Federated classifier across three hospitals, DP-SGD + CKKS.",
        "purpose": "diagnostic_research",
        "ethics_reference": "IRB-2026-0142",
        "datasets": [f"biopsies-hospital-{x}" for x in SITES],
        "model": {"name": "tabular-mlp", "version": "1", "hyperparameters": {}},
        "training": {
            "rounds": 2,
            "local_epochs": 1,
            "batch_size": 32,
            "learning_rate": 0.1,
            "optimizer": "sgd",
        },
        "privacy": {"epsilon": 6.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "federation": {"min_sites": 3, "round_timeout_s": 300},
        "encryption": {"enabled": True},
    }
    study = researcher("POST", "/api/v1/studies", json=contract)
    assert study["state"] == "awaiting_approvals", study
    study_id, contract_hash = study["id"], study["contract_hash"]
    for x, pod in sites.items():
        shown = ok(pod.run("agent", args=["site-node", "study", "show", study_id]), "study show")
        assert contract_hash[:12] in shown.replace(" ", ""), shown
        ok(
            pod.run(
                "agent",
                args=[
                    "site-node",
                    "study",
                    "approve",
                    study_id,
                    "--hash",
                    contract_hash,
                    "--reason",
                    f"Approved by the data access committee of Hospital {x.upper()}.",
                ],
            ),
            f"hospital-{x} approves",
        )

    def keys_held() -> bool:
        from site_node.federation.approvals import ApprovalStore

        return all(
            ApprovalStore(pod.host_path("/var/lib/concord/site")).study_key(study_id) is not None
            for pod in sites.values()
        )

    wait_for("every site to hold the study key", keys_held, timeout=180)

    # --- the study runs through the SuperLink of the chart, and is released ----------------
    researcher("POST", f"/api/v1/studies/{study_id}/run")

    # High availability as the chart declares it: once round 1 runs, one API replica
    # crashes (SIGKILL, like a lost node); the study goes on through the other.
    def training() -> bool:
        current = researcher("GET", f"/api/v1/studies/{study_id}")
        assert current["state"] not in ("failed", "aborted"), current
        return int(current["current_round"]) >= 1

    wait_for("round 1 to start", training, timeout=300, interval=1)
    crashed = apis[0].processes["api"]
    os.killpg(crashed.pid, signal.SIGKILL)
    crashed.wait(timeout=30)

    def ended() -> dict[str, Any] | None:
        current = researcher("GET", f"/api/v1/studies/{study_id}")
        return current if current["state"] in ("completed", "failed", "aborted") else None

    final = wait_for("the study to end", ended, timeout=600, interval=2)
    assert final["state"] == "completed", final

    release_url = f"/api/v1/studies/{study_id}/release"

    def signed_off() -> dict[str, Any] | None:
        status = researcher("GET", release_url)
        return status if not status["pending_sites"] and status["model_sha256"] else None

    status = wait_for("every site to sign off the model", signed_off, timeout=180)
    assert status["hashes_agree"] is True
    assert sorted(s["site_id"] for s in status["signoffs"]) == [f"hospital-{x}" for x in SITES]
    card = researcher("POST", release_url)
    assert card["contract_hash"] == contract_hash
    model = researcher("GET", f"{release_url}/model")
    assert hashlib.sha256(model.content).hexdigest() == status["model_sha256"]

    # --- the compliance officer verifies the audit log against the operator's key ----------
    def witnessed() -> bool:
        head = researcher("GET", "/api/v1/audit/heads/latest")
        return bool(head["witnessed"])

    wait_for("a witnessed audit head", witnessed, timeout=120)
    verified = cli(
        compliance_token,
        "audit",
        "verify",
        "--server-key",
        head_public,
        "--site-keys",
        str(site_keys_file),
    )
    out = ok(verified, "consortium audit verify")
    assert "OK" in out or "ok" in out.lower(), out
    entries = researcher("GET", "/api/v1/audit/heads/latest")["tree_size"]
    assert entries > 10

    # Every hospital's traffic went through its proxy: the API and Keycloak (httpx) and the
    # SuperLink (gRPC), by the public names.
    for x, proxy in proxies.items():
        hosts = {tunnel.rpartition(":")[0] for tunnel in proxy.tunnels}
        assert hosts == set(PUBLIC_NAMES), (x, proxy.tunnels)

    # Both API replicas served the study (the Service spread the requests), the second
    # alone after the first crashed.
    for api in apis:
        assert "/api/v1/" in log_of(api, "api", cluster), f"{api.name} served nothing"
    assert apis[0].processes["api"].returncode == -signal.SIGKILL


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ready(port: int, path: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _dead(pod: Pod, cluster: Cluster) -> bool:
    return any(process.poll() is not None for process in pod.processes.values())
