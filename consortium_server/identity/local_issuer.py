"""The embedded-default token issuer: a one-key, Keycloak-shaped OIDC issuer inside the server.

When Concord runs without Keycloak (the single-machine embedded default, the demo, tests),
the server signs its own access tokens. They have exactly the claim shape Keycloak's do, so
the same :class:`~consortium_server.identity.verifier.TokenVerifier` checks both.

The private key lives in a PEM file (RSA 2048+ or EC P-256) created on first start with mode
0600; its key id is the RFC 7638 JWK thumbprint of the public key, so it is stable across
restarts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from concord_protocol.private_files import write_private_file
from consortium_server.identity.jwks import JwksSource, StaticJwksSource

__all__ = ["KeyType", "LocalIssuer", "jwk_thumbprint"]

logger = logging.getLogger(__name__)

KeyType = Literal["RSA", "EC"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: Members of each key type's public JWK that enter the RFC 7638 thumbprint.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url, unpadded) of a public RSA or EC JWK."""
    kty = jwk.get("kty")
    if kty not in _THUMBPRINT_MEMBERS:
        raise ValueError(f"cannot compute a thumbprint for key type {kty!r}")
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[kty]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _public_jwk(key: PrivateKey) -> tuple[dict[str, Any], str]:
    """The public JWK (without kid/use/alg) and the JWS algorithm for ``key``."""
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "RS256"
    return ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "ES256"


def _check_key(key: object, origin: str) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"{origin}: RSA key has {key.key_size} bits, at least 2048 needed")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{origin}: EC key on curve {key.curve.name}, only P-256 is used")
        return key
    raise ValueError(f"{origin}: unsupported key type {type(key).__name__} (use RSA or EC P-256)")


def _generate(key_type: KeyType) -> PrivateKey:
    if key_type == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"key_type must be 'RSA' or 'EC', got {key_type!r}")


def _write_new_key_file(key_file: Path, pem: bytes) -> bool:
    """Create ``key_file`` (mode 0600 from the start) atomically; False if another process
    got there first (a key is never overwritten)."""
    try:
        write_private_file(key_file, pem, overwrite=False)
    except FileExistsError:
        return False
    return True


class LocalIssuer:
    """Signs Keycloak-shaped access tokens with one private key.

    Build it with :meth:`load_or_create`. :meth:`key_source` gives the verifier the public
    key set; :meth:`openid_configuration` is the discovery document a router can serve.
    """

    def __init__(self, *, private_key: PrivateKey, issuer: str) -> None:
        if not issuer:
            raise ValueError("issuer must not be empty")
        self._private_key = _check_key(private_key, "private_key")
        public_jwk, self._algorithm = _public_jwk(self._private_key)
        self._kid = jwk_thumbprint(public_jwk)
        self._public_jwk = {**public_jwk, "kid": self._kid, "use": "sig", "alg": self._algorithm}
        self._issuer = issuer

    @classmethod
    def load_or_create(
        cls, key_file: Path, issuer: str, *, key_type: KeyType = "RSA"
    ) -> LocalIssuer:
        """Load the PEM private key in ``key_file``, or create one there first.

        A new key is ``key_type`` (RSA 2048, as Keycloak uses by default, or EC P-256), written
        unencrypted as PKCS#8 PEM with mode 0600; missing parent directories are created.
        An existing file may hold either key type, whatever ``key_type`` says.
        """
        key_file = Path(key_file)
        if not key_file.exists():
            key = _generate(key_type)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if _write_new_key_file(key_file, pem):
                logger.info("created local issuer signing key %s", key_file)
                return cls(private_key=key, issuer=issuer)
        mode = stat.S_IMODE(key_file.stat().st_mode)
        if mode & 0o077:
            logger.warning(
                "local issuer key %s is readable by other users (mode %o); use 0600",
                key_file,
                mode,
            )
        try:
            loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{key_file} is not an unencrypted PEM private key: {error}"
            ) from error
        return cls(private_key=_check_key(loaded, str(key_file)), issuer=issuer)

    @property
    def issuer(self) -> str:
        """The ``iss`` of every token this issuer mints."""
        return self._issuer

    @property
    def kid(self) -> str:
        """Key id of the signing key (its RFC 7638 thumbprint)."""
        return self._kid

    @property
    def algorithm(self) -> str:
        """JWS algorithm of the signing key (``RS256`` or ``ES256``)."""
        return self._algorithm

    def jwks(self) -> dict[str, Any]:
        """The public key set (``{"keys": [...]}``), as served at the ``certs`` endpoint."""
        return {"keys": [dict(self._public_jwk)]}

    def key_source(self) -> JwksSource:
        """A key source for :class:`~consortium_server.identity.verifier.TokenVerifier`."""
        return StaticJwksSource(self.jwks())

    def mint(
        self,
        *,
        subject: str,
        roles: Sequence[str],
        organisation: str | None,
        audience: str,
        ttl_s: int = 3600,
        client_id: str | None = None,
        now: int | None = None,
    ) -> str:
        """Sign an access token with Keycloak's claim shape.

        Claims: ``iss``, ``sub``, ``aud``, ``exp`` (``now + ttl_s``), ``iat`` and ``nbf``
        (``now``), a random ``jti``, ``azp`` (``client_id``, when given), ``typ: "Bearer"``,
        ``realm_access.roles`` and ``organisation`` (when not None). ``now`` (Unix seconds)
        defaults to the current time; pass a past value to mint an expired token in tests.
        """
        if not subject:
            raise ValueError("subject must not be empty")
        if not audience:
            raise ValueError("audience must not be empty")
        if isinstance(roles, str):
            raise TypeError("roles must be a sequence of role names, not a single string")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        issued_at = int(time.time()) if now is None else int(now)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": subject,
            "aud": audience,
            "exp": issued_at + ttl_s,
            "iat": issued_at,
            "nbf": issued_at,
            "jti": secrets.token_urlsafe(16),
            "typ": "Bearer",
            "realm_access": {"roles": [str(role) for role in roles]},
        }
        if client_id is not None:
            claims["azp"] = client_id
        if organisation is not None:
            claims["organisation"] = organisation
        return jwt.encode(
            claims,
            self._private_key,
            algorithm=self._algorithm,
            headers={"kid": self._kid, "typ": "JWT"},
        )

    def openid_configuration(self, base_url: str | None = None) -> dict[str, Any]:
        """The OIDC discovery document (``/.well-known/openid-configuration``).

        Endpoints sit under ``base_url`` (where the realm's endpoints are reachable; by
        default the issuer itself), on Keycloak's paths, so python-keycloak and other
        Keycloak clients can use the local issuer unchanged. The local issuer grants no
        token over HTTP (tokens are minted on the server's machine, ``consortium token``):
        its token endpoint exists and answers every request with RFC 6749's
        ``unsupported_grant_type``, and the document lists no grant type.
        """
        root = (base_url or self._issuer).rstrip("/")
        endpoints = f"{root}/protocol/openid-connect"
        return {
            "issuer": self._issuer,
            "jwks_uri": f"{endpoints}/certs",
            "token_endpoint": f"{endpoints}/token",
            "grant_types_supported": [],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "token_endpoint_auth_methods_supported": [],
            "id_token_signing_alg_values_supported": [self._algorithm],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "nbf",
                "jti",
                "azp",
                "typ",
                "realm_access",
                "organisation",
            ],
        }

    def __repr__(self) -> str:
        return f"LocalIssuer(issuer={self._issuer!r}, kid={self._kid!r}, alg={self._algorithm!r})"
