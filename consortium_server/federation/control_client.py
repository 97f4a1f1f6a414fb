"""The consortium server's client for the SuperLink's Control API, over mutual TLS.

Why not the ``flwr`` CLI: Concord serves Control on a listener of its own that requires a
client certificate signed by the federation CA
(:mod:`~consortium_server.federation.superlink_launcher`), because Flower 1.41's Control
API authenticates nobody (its OSS account plugin lets every request through). The ``flwr``
CLI can verify the server but cannot present a client certificate
(``ProtobufClient.from_server_address`` builds only ``verify=``). So the server talks to
Control through Flower's own Python client, :class:`flwr.supercore.control.ControlHttpClient`,
given an :class:`ssl.SSLContext` that trusts the federation CA and carries the server's
client certificate (:meth:`ControlEndpoint.ssl_context`). The requests are the ones the
CLI sends: ``StartRun`` with the FAB built as ``flwr run`` builds it
(``flwr.cli.build.build_fab_from_disk``) and the run config as its override config,
``ListRuns``, ``StopRun``, ``RegisterNode`` (the OpenSSH EC key as PEM, as ``flwr
supernode register`` sends it) and ``UnregisterNode``.

Every failure (refused TLS handshake, HTTP error, Flower error body) becomes a
:class:`~concord_protocol.processes.FlowerProcessError` with Flower's message as detail,
which is what callers of :mod:`~consortium_server.federation.processes` already handle.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from concord_protocol.processes import FlowerProcessError

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

__all__ = [
    "ControlEndpoint",
    "control_client",
    "register_node",
    "run_status_text",
    "start_run",
    "stop_run",
    "unregister_node",
]


@dataclass(frozen=True)
class ControlEndpoint:
    """Where the SuperLink's Control listener is and how to authenticate to it."""

    #: ``host:port`` of the Control listener (its certificate must name ``host``).
    address: str
    #: CA that signed the SuperLink's server certificate.
    ca_cert: Path | None
    #: This server's client certificate and key (PEM), signed by the federation CA.
    client_cert: Path | None = None
    client_key: Path | None = None
    #: Plain HTTP (a stock SuperLink on loopback in tests; never with Concord's launcher).
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext:
        """TLS client context: verify the SuperLink against ``ca_cert``, present the client
        certificate when one is configured."""
        if self.ca_cert is None:
            raise FlowerProcessError(f"no CA certificate to verify the SuperLink {self.address}")
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if self.client_cert is not None:
            context.load_cert_chain(
                str(self.client_cert), str(self.client_key) if self.client_key else None
            )
        return context


@contextmanager
def control_client(endpoint: ControlEndpoint, *, timeout: float = 60.0) -> Iterator[Any]:
    """A :class:`ControlHttpClient` for ``endpoint``, closed on exit; errors as
    :class:`FlowerProcessError`."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    verify: ssl.SSLContext | bool
    if endpoint.insecure:
        base_url, verify = f"http://{endpoint.address}", False
    else:
        base_url, verify = f"https://{endpoint.address}", endpoint.ssl_context()
    client: ControlHttpClient = ControlHttpClient(
        base_url,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        verify=verify,
        timeout=timeout,
    )
    try:
        with _flower_errors(endpoint):
            yield client
    finally:
        client.close()


@contextmanager
def _flower_errors(endpoint: ControlEndpoint) -> Iterator[None]:
    import httpx

    try:
        yield
    except httpx.HTTPStatusError as exc:
        raise FlowerProcessError(
            f"the SuperLink's Control API at {endpoint.address} answered "
            f"{exc.response.status_code}",
            _error_text(exc.response),
        ) from None
    except (httpx.TransportError, ssl.SSLError, OSError) as exc:
        raise FlowerProcessError(
            f"cannot reach the SuperLink's Control API at {endpoint.address}",
            f"{type(exc).__name__}: {exc}",
        ) from None


def _error_text(response: Any) -> str:
    try:
        from flwr.supercore.error import FlowerError

        error = FlowerError.from_json(response.text)
        if error is not None:
            return f"{error.code}: {error}"
        return str(response.text)[:2000]
    except Exception:  # not a Flower error body
        return str(response.text)[:2000]


def start_run(endpoint: ControlEndpoint, app_dir: Path, run_config: Mapping[str, Any]) -> int:
    """``StartRun`` of the bundle in ``app_dir`` (built as ``flwr run`` builds it) with
    ``run_config`` (flattened) as override config; the run id."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import flatten_dict
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    content = build_fab_from_disk(app_dir)
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    request = StartRunRequest(
        fab=fab_to_proto(fab),
        override_config=user_config_to_proto(flatten_dict(dict(run_config))),
        federation="",
    )
    with control_client(endpoint) as client:
        response = client.StartRun(request)
    if not response.HasField("run_id"):
        raise FlowerProcessError("the SuperLink did not start a run", str(response))
    return int(response.run_id)


def run_status_text(endpoint: ControlEndpoint, run_id: int) -> str | None:
    """The run's status as ``flwr ls`` shows it (``pending``, ``running``,
    ``finished:completed`` ...), or None if the SuperLink lists no such run."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    with control_client(endpoint) as client:
        response = client.ListRuns(ListRunsRequest(run_id=run_id))
    for proto in response.run_dict.values():
        run = run_from_proto(proto)
        if run.run_id == run_id:
            status, sub_status = str(run.status.status), str(run.status.sub_status)
            return f"{status}:{sub_status}" if sub_status else status
    return None


def stop_run(endpoint: ControlEndpoint, run_id: int) -> None:
    """``StopRun``."""
    from flwr.proto.control_pb2 import StopRunRequest

    with control_client(endpoint, timeout=60.0) as client:
        client.StopRun(StopRunRequest(run_id=run_id))


def register_node(endpoint: ControlEndpoint, public_key_openssh: bytes, *, name: str) -> int:
    """``RegisterNode`` of an OpenSSH NIST EC public key (sent as PEM, as ``flwr supernode
    register`` does); the node id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.proto.control_pb2 import RegisterNodeRequest

    try:
        key = serialization.load_ssh_public_key(public_key_openssh.strip())
    except (ValueError, TypeError) as exc:
        raise FlowerProcessError("not an OpenSSH public key", str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FlowerProcessError("a SuperNode key must be a NIST EC key (ecdsa)")
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with control_client(endpoint) as client:
        response = client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
    if not response.node_id:
        raise FlowerProcessError("the SuperLink did not register the SuperNode key")
    return int(response.node_id)


def unregister_node(endpoint: ControlEndpoint, node_id: int) -> None:
    """``UnregisterNode``."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest

    with control_client(endpoint) as client:
        client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
