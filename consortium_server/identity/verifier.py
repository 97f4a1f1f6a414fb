"""Bearer-token verification: one path for every issuer (Keycloak or the local issuer).

:class:`TokenVerifier` checks a JWT access token's signature against the issuer's published
keys (a :class:`~consortium_server.identity.jwks.JwksSource`), then its claims (``exp``,
``nbf``, ``iat``, ``iss``, ``aud``), and turns it into a
:class:`~concord_protocol.principals.Principal`. Failures are domain errors:

* ``AuthenticationError("auth.expired_token")`` for an expired token;
* ``AuthenticationError("auth.invalid_token")`` for every other bad token, with a reason a
  person can act on (the token itself is never echoed);
* ``ServiceUnavailableError(code="auth.issuer_unavailable")`` when the issuer's keys cannot
  be fetched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import jwt

from concord_protocol.principals import Principal, Role
from consortium_server.errors import AuthenticationError
from consortium_server.identity.jwks import JwksSource

__all__ = ["SUPPORTED_ALGORITHMS", "TokenVerifier"]

logger = logging.getLogger(__name__)

#: Asymmetric JWS algorithms the verifier can be configured with. ``none`` and the HMAC
#: family (``HS*``) are never accepted: a shared secret cannot come from a public JWKS.
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

_MAX_ECHO = 80


def _echo(value: object) -> str:
    """A short, quoted rendering of an attacker-controlled value for error messages."""
    if isinstance(value, str):
        text = value if value.isprintable() else value.encode("unicode_escape").decode("ascii")
    else:
        text = repr(value)
    if len(text) > _MAX_ECHO:
        text = text[:_MAX_ECHO] + "..."
    return f"'{text}'"


def _utc(timestamp: object) -> str:
    if isinstance(timestamp, int | float) and not isinstance(timestamp, bool):
        try:
            moment = datetime.fromtimestamp(timestamp, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return str(timestamp)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return "an unreadable time"


def _invalid(reason: str) -> AuthenticationError:
    return AuthenticationError(reason, code="auth.invalid_token")


class TokenVerifier:
    """Verifies bearer tokens of one issuer and returns the caller's :class:`Principal`.

    ``issuer`` must equal the token's ``iss`` exactly; ``audience`` must be the token's
    ``aud`` or one of its entries (Keycloak puts a list there). ``organisation_claim`` names
    the claim that carries the caller's organisation (hospital). ``leeway_s`` tolerates
    clock skew on ``exp``/``nbf``/``iat``. ``algorithms`` lists accepted asymmetric
    signature algorithms; ``none`` and ``HS*`` are refused at construction.
    """

    def __init__(
        self,
        *,
        key_source: JwksSource,
        issuer: str,
        audience: str,
        organisation_claim: str = "organisation",
        leeway_s: int = 30,
        algorithms: Sequence[str] = ("RS256", "ES256"),
        max_lifetime_s: int | None = None,
    ) -> None:
        if not issuer:
            raise ValueError("issuer must not be empty")
        if not audience:
            raise ValueError("audience must not be empty")
        if not organisation_claim:
            raise ValueError("organisation_claim must not be empty")
        if leeway_s < 0:
            raise ValueError(f"leeway_s must not be negative, got {leeway_s}")
        if isinstance(algorithms, str):
            raise TypeError("algorithms must be a sequence of names, not a single string")
        unsupported = sorted(set(algorithms) - SUPPORTED_ALGORITHMS)
        if unsupported:
            raise ValueError(
                f"unsupported token algorithm(s) {unsupported}: choose from "
                f"{sorted(SUPPORTED_ALGORITHMS)} ('none' and HS* are never accepted)"
            )
        if not algorithms:
            raise ValueError("algorithms must name at least one algorithm")
        self._key_source = key_source
        self._issuer = issuer
        self._audience = audience
        self._organisation_claim = organisation_claim
        self._leeway_s = leeway_s
        self._algorithms = tuple(dict.fromkeys(algorithms))
        if max_lifetime_s is not None and max_lifetime_s <= 0:
            raise ValueError(f"max_lifetime_s must be positive, got {max_lifetime_s}")
        self._max_lifetime_s = max_lifetime_s

    @property
    def issuer(self) -> str:
        """The configured issuer (the token's ``iss`` must equal it)."""
        return self._issuer

    @property
    def audience(self) -> str:
        """The audience every accepted token must name."""
        return self._audience

    def verify(self, token: str) -> Principal:
        """Verify ``token`` (the bearer token without the ``Bearer`` prefix).

        Returns the :class:`Principal` it identifies. Raises ``AuthenticationError``
        (``auth.expired_token`` or ``auth.invalid_token``) or ``ServiceUnavailableError``
        (``auth.issuer_unavailable``) as described in the module docstring.
        """
        if not isinstance(token, str) or not token.strip():
            raise _invalid("the bearer token is empty")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise _invalid("the bearer token is not a well-formed JWT") from error

        alg = header.get("alg")
        if alg not in self._algorithms:
            raise _invalid(
                f"token signing algorithm {_echo(alg)} is not accepted "
                f"(accepted: {', '.join(self._algorithms)})"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _invalid("token header names no signing key (kid)")

        key = self._signing_key(kid, alg)
        claims = self._decode(token, key, alg, kid)
        self._check_issuer(claims)
        self._check_lifetime(claims)
        self._check_audience(claims)
        self._check_token_type(claims)
        return self._principal(claims)

    # -- keys ---------------------------------------------------------------------------

    def _signing_key(self, kid: str, alg: str) -> Any:
        jwk = self._find_jwk(self._key_source.get_jwks(), kid)
        if jwk is None:
            # The issuer may have rotated its keys since we cached them: ask once for a
            # fresh set (the source rate-limits this), then give up.
            jwk = self._find_jwk(self._key_source.get_jwks(force_refresh=True), kid)
        if jwk is None:
            raise _invalid(
                f"token was signed with key {_echo(kid)}, which issuer '{self._issuer}' "
                "does not publish"
            )
        if jwk.get("use", "sig") != "sig":
            raise _invalid(f"key {_echo(kid)} of the issuer is not a signing key")
        if "alg" in jwk and jwk["alg"] != alg:
            raise _invalid(
                f"token algorithm {_echo(alg)} does not match key {_echo(kid)}'s "
                f"algorithm {_echo(jwk['alg'])}"
            )
        try:
            return jwt.PyJWK(dict(jwk), algorithm=alg).key
        except jwt.PyJWTError as error:
            raise _invalid(
                f"key {_echo(kid)} of the issuer cannot verify {_echo(alg)} signatures"
            ) from error

    @staticmethod
    def _find_jwk(jwks: Mapping[str, Any], kid: str) -> Mapping[str, Any] | None:
        for jwk in jwks.get("keys", []):
            if isinstance(jwk, Mapping) and jwk.get("kid") == kid:
                return jwk
        return None

    # -- claims -------------------------------------------------------------------------

    def _decode(self, token: str, key: Any, alg: str, kid: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                leeway=self._leeway_s,
                options={
                    "require": ["exp"],
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    # Checked below with messages that say what was expected.
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.ExpiredSignatureError as error:
            exp = _unverified_claim(token, "exp")
            raise AuthenticationError(
                f"the token expired at {_utc(exp)}", code="auth.expired_token"
            ) from error
        except jwt.InvalidSignatureError as error:
            raise _invalid(
                f"token signature does not verify with issuer key {_echo(kid)}"
            ) from error
        except jwt.ImmatureSignatureError as error:
            if "(iat)" in str(error):
                reason = "the token was issued in the future (iat); check the issuer's clock"
            else:
                reason = f"the token is not valid before {_utc(_unverified_claim(token, 'nbf'))}"
            raise _invalid(reason) from error
        except jwt.MissingRequiredClaimError as error:
            raise _invalid(f"the token has no '{error.claim}' claim") from error
        except jwt.PyJWTError as error:
            raise _invalid(f"the token is not valid: {error}") from error
        return claims

    def _check_issuer(self, claims: Mapping[str, Any]) -> None:
        iss = claims.get("iss")
        if iss is None:
            raise _invalid("the token has no 'iss' claim")
        if iss != self._issuer:
            raise _invalid(
                f"token issuer {_echo(iss)} is not the configured issuer '{self._issuer}'"
            )

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """A stolen token is useful until it expires: one minted to last longer than the
        configured maximum (``exp - iat``), or without ``iat`` to measure it by, is refused."""
        if self._max_lifetime_s is None:
            return
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise _invalid("the token has no 'iat' claim to bound its lifetime by")
        assert isinstance(exp, int | float)  # required and checked by the decoder
        lifetime = float(exp) - float(iat)
        if lifetime > self._max_lifetime_s + self._leeway_s:
            raise _invalid(
                f"the token is minted to last {int(lifetime)} s, longer than the "
                f"{self._max_lifetime_s} s this server accepts"
            )

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience not in audiences:
            raise _invalid(f"token audience does not include '{self._audience}'")

    @staticmethod
    def _check_token_type(claims: Mapping[str, Any]) -> None:
        # Keycloak marks its tokens with a ``typ`` claim: "Bearer" for access tokens, "ID"
        # for ID tokens, "Refresh" for refresh tokens. An ID token of a client named like the
        # API would carry the right audience; only access tokens may call the API.
        typ = claims.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() != "bearer"):
            raise _invalid(f"token is of type {_echo(typ)}, not an access token (Bearer)")

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _invalid("the token has no subject ('sub' claim)")
        client_id = claims.get("azp") or claims.get("client_id")
        token_id = claims.get("jti")
        exp = claims.get("exp")
        return Principal(
            subject=subject,
            roles=self._roles(claims),
            organisation=self._organisation(claims),
            issuer=self._issuer,
            client_id=client_id if isinstance(client_id, str) else None,
            token_id=token_id if isinstance(token_id, str) else None,
            expires_at=int(exp) if isinstance(exp, int | float) else None,
        )

    @staticmethod
    def _roles(claims: Mapping[str, Any]) -> frozenset[Role]:
        realm_access = claims.get("realm_access")
        names = realm_access.get("roles") if isinstance(realm_access, Mapping) else None
        if not isinstance(names, list):
            return frozenset()
        known = {role.value: role for role in Role}
        return frozenset(known[name] for name in names if isinstance(name, str) and name in known)

    def _organisation(self, claims: Mapping[str, Any]) -> str | None:
        value = claims.get(self._organisation_claim)
        # Keycloak's organisation mapper emits a list of aliases (or an object keyed by
        # alias); one organisation is unambiguous, several or none are never guessed.
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        elif isinstance(value, Mapping) and len(value) == 1:
            value = next(iter(value))
        if isinstance(value, str) and value:
            return value
        if value is not None:
            logger.info(
                "token claim %r does not name exactly one organisation; treating as none",
                self._organisation_claim,
            )
        return None


def _unverified_claim(token: str, name: str) -> object:
    """A claim of a token whose signature was already verified (for error messages only)."""
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return payload.get(name)
