"""Running rendered Helm manifests on this machine: pods as local processes.

No Kubernetes cluster can run here, so the deployment tests play the kubelet, kube-proxy and
the ingress controller, and nothing else:

- **Pod** (in a :class:`Cluster`): a rendered pod spec. Each container process runs in a
  mount namespace of its own (``unshare --mount``, as root) where every volume it mounts is
  a bind mount *at its mount path*, read-only where the manifest says: ConfigMaps and
  Secrets as files (from the rendered objects, or ``external`` ones: what an operator
  creates with ``kubectl create secret``), emptyDirs as fresh directories, one directory per
  PersistentVolumeClaim name (so two pods share a volume only when the chart gives them the
  same claim), hostPath volumes from ``data_dirs``. Paths are never rewritten: a path inside
  a file (a datasets list) means what it means in the container. The image's own files
  (the shipped policies) are bound where the Dockerfiles put them.
- **Network namespaces**: every port a pod listens on (its containerPorts, ``--port`` values,
  ``--*-address`` and ``0.0.0.0:P`` values, ``*PORT`` env values) gets a free loopback port of
  its own, as the pod's own network namespace would give it.
- **Services**: ``<name>.<namespace>.svc[.cluster.local]:<port>`` in args and env becomes the
  loopback port of the selected pod's target port, through a round-robin TCP proxy when the
  Service selects several pods (kube-proxy).
- **Environment**: a container gets its rendered env and the image's ENV (as in
  deploy/docker/*.Dockerfile), never this test process's environment.

Without a cluster (the older wiring tests) a Pod rewrites mount paths to directories under
its root instead, and runs with this process's environment.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel

from tests.deploy.charts import NAMESPACE, Rendered

BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_POLICIES = "/opt/concord/share/policies"
#: Where a pod's volume sources are staged in its mount namespace (a tmpfs over /mnt there).
_STAGE = "/mnt"

#: What both Dockerfiles set with ENV (deploy/docker/*.Dockerfile); PATH leads to this venv,
#: which stands in for the image's /opt/concord.
IMAGE_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/tmp",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "LANG": "C.UTF-8",
}


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on {port} after {timeout}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- pods --------------------------------------------------------------------------------

_LISTEN = re.compile(r"\b(?:0\.0\.0\.0|127\.0\.0\.1):(\d{1,5})\b")


class Pod:
    """A rendered pod spec run on this machine (see the module docstring).

    ``cluster``: the :class:`Cluster` the pod runs in (Services, claims, its own ports);
    without one, ports and Service names are left as rendered.
    """

    def __init__(
        self,
        rendered: Rendered,
        kind: str,
        suffix: str,
        root: Path,
        external: dict[str, dict[str, str]] | None = None,
        data_dirs: dict[str, Path] | None = None,
        *,
        cluster: Cluster | None = None,
        name: str = "",
    ) -> None:
        self.rendered = rendered
        workload = rendered.get(kind, suffix)
        self.name = name or workload["metadata"]["name"]
        self.labels: dict[str, str] = dict(workload["spec"]["template"]["metadata"]["labels"])
        self.spec = workload["spec"]["template"]["spec"]
        self.root = root
        self.external = external or {}
        self.cluster = cluster
        self.substitutions: dict[str, str] = {}
        #: Where each mount path's files are on this machine.
        self.sources: dict[str, Path] = {}
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        mounts: dict[str, str] = {}
        for container in self.containers():
            for mount in container.get("volumeMounts", []):
                assert mounts.setdefault(mount["mountPath"], mount["name"]) == mount["name"]
        for path in sorted(mounts):
            local = root / "volumes" / path.lstrip("/") if cluster else root / path.lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            volume = volumes[mounts[path]]
            shared = (data_dirs or {}).get(mounts[path])
            if shared is None and "persistentVolumeClaim" in volume and cluster is not None:
                shared = cluster.claim(volume["persistentVolumeClaim"]["claimName"])
            self._fill(volume, local, None if cluster else shared)
            self.sources[path] = shared if (shared is not None and cluster) else local
        # Longest first, so nested mounts win.
        for path in sorted(mounts, key=len, reverse=True):
            self.substitutions[path] = str(root / path.lstrip("/"))
        # What the images bake in (Dockerfiles: COPY policies /opt/concord/share/policies).
        self.substitutions.setdefault(IMAGE_POLICIES, str(REPO_ROOT / "policies"))
        self.ports: dict[int, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        if cluster is not None:
            self.substitutions = {}  # paths stay as rendered: each process gets its mounts
            for port in sorted(self._listen_ports()):
                self.ports[port] = free_port()

    def host_path(self, path: str) -> Path:
        """Where a path inside the pod's volumes is on this machine (for the test's reads)."""
        for mount in sorted(self.sources, key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                return self.sources[mount] / path[len(mount) :].lstrip("/")
        raise KeyError(f"{path} is on no volume of {self.name}")

    def _namespaced(self, container: dict[str, Any], argv: list[str]) -> list[str]:
        """``argv`` in a mount namespace of its own holding the container's volumes at their
        mount paths (bind mounts; read-only where the manifest says) and the image's files."""
        binds = [(str(REPO_ROOT / "policies"), IMAGE_POLICIES, True)]
        for mount in container.get("volumeMounts", []):
            source = self.sources[mount["mountPath"]]
            binds.append((str(source), mount["mountPath"], bool(mount.get("readOnly"))))
        # Every source is first bound under a private staging tmpfs, then staged -> target:
        # binding straight from the source would fail once an earlier target hides it (a
        # checkout under /tmp, hidden by the pod's /tmp volume). The checkout and the venv
        # the commands run from are bound back over any target that hides them, as an
        # image would have them outside its volumes.
        steps = [f"mount -t tmpfs concord-stage {_STAGE}"]
        ordered = sorted(binds, key=lambda b: b[1].count("/"))
        targets = [Path(t) for _s, t, _r in ordered]
        keep = [
            p
            for p in sorted({REPO_ROOT.resolve(), Path(sys.prefix).resolve()})
            if any(p == t or t in p.parents for t in targets)
        ]
        staged_sources = [s for s, _t, _r in ordered] + [str(p) for p in keep]
        for index, source in enumerate(staged_sources):
            staged = f"{_STAGE}/{index}"
            steps.append(f"mkdir -p {staged} && mount --bind {shlex.quote(source)} {staged}")
        for index, (_source, target, read_only) in enumerate(ordered):
            dst = shlex.quote(target)
            steps.append(f"mkdir -p {dst} && mount --bind {_STAGE}/{index} {dst}")
            if read_only:
                steps.append(f"mount -o remount,bind,ro {dst}")
        for offset, path in enumerate(keep, start=len(ordered)):
            dst = shlex.quote(str(path))
            steps.append(f"mkdir -p {dst} && mount --bind {_STAGE}/{offset} {dst}")
        script = " && ".join([*steps, 'exec "$@"'])
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "pod", *argv]

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("initContainers", [])) + list(self.spec["containers"])

    def _listen_ports(self) -> set[int]:
        ports: set[int] = set()
        for container in self.containers():
            ports |= {int(p["containerPort"]) for p in container.get("ports", [])}
            argv = container.get("command", []) + container.get("args", [])
            for flag, value in itertools.pairwise(["", *argv]):
                # Where it binds: --port, an --*-address flag, or any 0.0.0.0:P (never a
                # peer it dials, such as --superlink 127.0.0.1:P).
                if flag == "--port":
                    ports.add(int(value))
                elif flag.endswith("-address") or value.startswith("0.0.0.0:"):
                    ports |= {int(p) for p in _LISTEN.findall(value)}
            for item in container.get("env", []):
                if item["name"].endswith("PORT") and str(item.get("value", "")).isdigit():
                    ports.add(int(item["value"]))
        for source in self.spec["containers"]:
            for ref in source.get("envFrom", []):
                data = self._source("ConfigMap", ref["configMapRef"]["name"])
                ports |= {int(v) for k, v in data.items() if k.endswith("PORT") and v.isdigit()}
        return ports

    def port(self, name_or_number: str | int) -> int:
        """The local port of one of the pod's container ports (by name or number)."""
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            return self.ports[int(name_or_number)]
        for container in self.spec["containers"]:
            for port in container.get("ports", []):
                if port.get("name") == name_or_number:
                    return self.ports[int(port["containerPort"])]
        raise KeyError(name_or_number)

    def _source(self, kind: str, name: str) -> dict[str, str]:
        if name in self.external:
            return self.external[name]
        found = [d for d in self.rendered.all(kind) if d["metadata"]["name"] == name]
        assert found, f"{kind} {name} is neither rendered nor given"
        return dict(found[0].get("data") or found[0].get("stringData") or {})

    def _fill(self, volume: dict[str, Any], local: Path, shared: Path | None) -> None:
        for kind, key, name_key in (
            ("Secret", "secret", "secretName"),
            ("ConfigMap", "configMap", "name"),
        ):
            if key in volume:
                content = self._source(kind, volume[key][name_key])
                for item in volume[key]["items"]:
                    target = local / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(content[item["key"]])
                    # What the kubelet leaves with fsGroup: the volume's mode, made
                    # readable by the group (so 0400 and 0440 both end up 0440).
                    target.chmod(volume[key].get("defaultMode", 0o644) | 0o440)
        if shared is not None:
            local.rmdir()
            local.symlink_to(shared)

    def local(self, value: str) -> str:
        """``value`` as this machine sees it: paths under mounts, listen addresses and
        Service names rewritten (see the module docstring)."""
        if self.cluster is not None:
            value = self.cluster.resolve_services(value)
            value = _LISTEN.sub(
                lambda m: f"127.0.0.1:{self.ports[int(m[1])]}" if int(m[1]) in self.ports else m[0],
                value,
            )
        if not self.substitutions:
            return value
        # One pass, longest mount first: a local path is never rewritten again.
        paths = "|".join(re.escape(p) for p in sorted(self.substitutions, key=len, reverse=True))
        pattern = rf"(?<![\w./-])({paths})(?=/|\s|$|[\"'])"
        return re.sub(pattern, lambda m: self.substitutions[m[1]], value)

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in self.containers() if c["name"] == name)

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self._source("ConfigMap", source["configMapRef"]["name"]))
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "fieldRef" in item["valueFrom"]:  # the downward API: what the kubelet sets
                field = item["valueFrom"]["fieldRef"]["fieldPath"]
                assert field == "metadata.name", field
                env[item["name"]] = f"{self.name}-pod"
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self._source("Secret", ref["name"])[ref["key"]]
        return env

    def argv(self, container: dict[str, Any]) -> list[str]:
        argv = container["command"] + container.get("args", [])
        out = []
        for index, arg in enumerate(argv):
            if self.cluster is not None and index and argv[index - 1] == "--port":
                arg = str(self.ports[int(arg)])
            out.append(self.local(arg))
        return out

    def process_env(self, container: dict[str, Any], **overrides: str) -> dict[str, str]:
        env = {k: self.local(v) for k, v in self.env(container).items()}
        if self.cluster is not None:
            for key, value in env.items():
                if key.endswith("PORT") and value.isdigit() and int(value) in self.ports:
                    env[key] = str(self.ports[int(value)])
        env.update(overrides)
        full = {**IMAGE_ENV, **{k: self.local(v) for k, v in IMAGE_ENV.items()}, **env}
        if self.cluster is None:  # the older wiring tests: this process's environment
            full = {**os.environ, **full}
        if full.get("HOME", "").startswith(str(self.root)):
            Path(full["HOME"]).mkdir(parents=True, exist_ok=True)
        full["PATH"] = f"{BIN}:/usr/local/bin:/usr/bin:/bin"
        return full

    def run(
        self, name: str, *, args: list[str] | None = None, timeout: float = 120, **overrides: str
    ) -> subprocess.CompletedProcess[str]:
        """Run container ``name`` to completion (an init container, a Job, or ``args`` as a
        ``kubectl exec`` in its environment)."""
        container = self.container(name)
        argv = args or self.argv(container)
        if self.cluster is not None:
            argv = self._namespaced(container, argv)
        return subprocess.run(
            argv,
            env=self.process_env(container, **overrides),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_init_containers(self) -> None:
        """Every init container, in order; each must succeed (as the kubelet requires)."""
        for container in self.spec.get("initContainers", []):
            result = self.run(container["name"])
            assert result.returncode == 0, (
                f"{self.name}: init container {container['name']} failed:\n"
                f"{result.stdout}\n{result.stderr}"
            )

    def start(
        self, name: str, log: Path, args: list[str] | None = None, **overrides: str
    ) -> subprocess.Popen[bytes]:
        container = self.container(name)
        argv = args or self.argv(container)
        if self.cluster is not None:
            argv = self._namespaced(container, argv)
        process = subprocess.Popen(
            argv,
            env=self.process_env(container, **overrides),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        if self.cluster is not None:
            self.cluster.processes.append(process)
        return process


# --- the cluster: Services, claims, proxies ------------------------------------------------


class _Listener:
    """A loopback listener serving each connection on a thread of its own (``_serve``)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()


class TcpProxy(_Listener):
    """A loopback TCP listener that forwards each connection to one of ``backends`` in turn
    (kube-proxy's round robin), optionally terminating TLS first (the ingress controller)."""

    def __init__(self, backends: list[int], *, tls: ssl.SSLContext | None = None) -> None:
        self.backends = backends
        self.tls = tls
        self._turn = itertools.count()
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            upstream = None
            for _ in range(len(self.backends)):
                port = self.backends[next(self._turn) % len(self.backends)]
                try:
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
                except OSError:
                    continue
            if upstream is None:
                client.close()
                return
            upstream.settimeout(None)
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
            _pipe(client, upstream)
        except (OSError, ssl.SSLError):
            with contextlib.suppress(OSError):
                client.close()


class ConnectProxy(_Listener):
    """A hospital's egress proxy: HTTP ``CONNECT host:port`` tunnels only (all of Concord's
    outbound traffic is TLS), with its own name resolution: ``hosts`` maps the consortium's
    public names to loopback, which nothing else here can resolve. ``tunnels`` records every
    ``host:port`` it opened, so a test can tell traffic went through it."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = hosts
        self.tunnels: list[str] = []
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = client.recv(4096)
                if not chunk:
                    client.close()
                    return
                head += chunk
            request, _, rest = head.partition(b"\r\n\r\n")
            method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or host not in self.hosts:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                client.close()
                return
            upstream = socket.create_connection((self.hosts[host], int(port)), timeout=5)
            upstream.settimeout(None)
            self.tunnels.append(target)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
            _pipe(client, upstream)
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                client.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class Cluster:
    """Pods of rendered charts, the Services between them and the claims they mount."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pods: list[Pod] = []
        self.services: dict[str, int] = {}
        self.proxies: list[TcpProxy] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._claims: dict[str, Path] = {}

    def claim(self, name: str) -> Path:
        """The directory of PersistentVolumeClaim ``name`` (one per claim)."""
        if name not in self._claims:
            path = self.root / "claims" / name
            path.mkdir(parents=True, exist_ok=True)
            self._claims[name] = path
        return self._claims[name]

    def pod(
        self,
        rendered: Rendered,
        kind: str,
        suffix: str,
        name: str,
        external: dict[str, dict[str, str]] | None = None,
        data_dirs: dict[str, Path] | None = None,
    ) -> Pod:
        pod = Pod(
            rendered,
            kind,
            suffix,
            self.root / name,
            external,
            data_dirs,
            cluster=self,
            name=name,
        )
        self.pods.append(pod)
        return pod

    def expose(self, rendered: Rendered) -> None:
        """Route every Service of ``rendered`` to the pods (made so far) it selects."""
        for service in rendered.all("Service"):
            selector = service["spec"]["selector"]
            pods = [p for p in self.pods if selector.items() <= p.labels.items()]
            assert pods, f"Service {service['metadata']['name']} selects no pod"
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                backends = [p.port(target) for p in pods]
                local = backends[0]
                if len(backends) > 1:
                    proxy = TcpProxy(backends)
                    self.proxies.append(proxy)
                    local = proxy.port
                name = service["metadata"]["name"]
                for host in (f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"):
                    self.services[f"{host}:{port['port']}"] = local

    def resolve_services(self, value: str) -> str:
        for address, port in sorted(self.services.items(), key=lambda kv: -len(kv[0])):
            value = re.sub(rf"(?<![\w.-]){re.escape(address)}(?!\d)", f"127.0.0.1:{port}", value)
        return value

    def ingress(self, backends: list[int], tls: ssl.SSLContext) -> int:
        """A TLS-terminating proxy in front of ``backends`` (the ingress controller)."""
        proxy = TcpProxy(backends, tls=tls)
        self.proxies.append(proxy)
        return proxy.port

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop(process)
        for proxy in self.proxies:
            proxy.close()


# --- settings ------------------------------------------------------------------------------


def settings_fields(model: type[BaseModel], prefix: str, delimiter: str = "__") -> set[str]:
    """Every environment name a pydantic-settings model reads (nested with ``__``)."""
    names = set()
    for field, info in model.model_fields.items():
        name = f"{prefix}{field}".upper()
        names.add(name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings_fields(annotation, f"{name}{delimiter}")
    return names


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` holding ``env`` while the block runs (settings read nothing else)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- keys and certificates -----------------------------------------------------------------

_PEM = serialization.Encoding.PEM


def _private_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class CertificateAuthority:
    """A private CA that issues loopback server certificates and client certificates."""

    def __init__(self, name: str) -> None:
        now = dt.datetime.now(dt.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(_PEM).decode()

    def issue(self, common_name: str, *, client: bool = False) -> tuple[str, str]:
        """(certificate, key) PEM: a server certificate for localhost/127.0.0.1, or with
        ``client`` a clientAuth certificate."""
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if client:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        else:
            names: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            if "." in common_name:  # a public name (reached through a proxy that resolves it)
                names.append(x509.DNSName(common_name))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(_PEM).decode(), _private_pem(key)


def make_tls(directory: Path | None = None) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and the API's Control client
    certificate (``client.crt``/``client.key``, clientAuth), PEM strings."""
    ca = CertificateAuthority("concord test CA")
    cert, key = ca.issue("localhost")
    client_cert, client_key = ca.issue("concord API", client=True)
    return {
        "ca.crt": ca.pem,
        "tls.crt": cert,
        "tls.key": key,
        "client.crt": client_cert,
        "client.key": client_key,
    }


def tls_handshake(
    port: int, ca_file: Path, cert: Path | None = None, key: Path | None = None
) -> str:
    """Complete a TLS 1.2 handshake with the listener on ``port`` (TLS 1.2: the server checks
    the client certificate inside the handshake, not after it as in 1.3); ``""`` when it
    succeeds, else the error."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return ""
        except (ssl.SSLError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"


def ed25519_pem() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
