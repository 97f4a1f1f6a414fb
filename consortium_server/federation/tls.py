"""Development TLS for the SuperLink: a private CA, a server certificate for loopback, and
the consortium server's client certificate for the Control listener.

Production uses the consortium's own PKI (the Helm chart takes the certificates from
Secrets). This is for ``consortium demo`` and tests: EC P-256, short-lived. The server
certificate names ``localhost`` and ``127.0.0.1`` (sites dial the Fleet listener, the
consortium server the Control listener, the ServerApp the loopback Runtime API, all on
loopback here). The client certificate (extended key usage ``clientAuth``) is what the
Control listener requires (:mod:`~consortium_server.federation.superlink_launcher`): the
CA certificate alone, which every site holds, opens nothing but the Fleet API.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from concord_protocol.private_files import write_private_file
from consortium_server.federation.processes import TlsFiles

__all__ = ["make_dev_tls"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_dev_tls(directory: Path, *, days: int = 1) -> TlsFiles:
    """Write a CA, a loopback server certificate and the Control client certificate, both
    signed by it, into ``directory`` (keys with mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Concord development CA"))
        .issuer_name(_name("Concord development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Concord consortium server"))
        .issuer_name(ca_cert.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_cert_path = directory / "control-client.pem"
    client_key_path = directory / "control-client.key"
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=client_cert_path,
        client_key=client_key_path,
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    client_cert_path.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    for path, private in ((files.server_key, key), (client_key_path, client_key)):
        write_private_file(
            path,
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return files
