"""Unit tests of token verification, the JWKS sources and the local issuer (no network)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from consortium_server.errors import AuthenticationError, ServiceUnavailableError
from consortium_server.identity import (
    CachingJwksSource,
    LocalIssuer,
    Principal,
    Role,
    StaticJwksSource,
    TokenVerifier,
    jwk_thumbprint,
)

AUDIENCE = "concord-api"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingFetch:
    """A JWKS fetch function that counts calls; its answer can be changed or made to fail."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self.jwks: Mapping[str, Any] = jwks
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self) -> Mapping[str, Any]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.jwks


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_parts(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())


def standard_claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": "user-1",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "realm_access": {"roles": ["researcher"]},
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


@pytest.fixture
def sign(issuer: LocalIssuer, issuer_key_file: Path) -> Callable[..., str]:
    """Sign arbitrary claims with the trusted issuer's key (for shapes ``mint`` won't make)."""
    key = serialization.load_pem_private_key(issuer_key_file.read_bytes(), password=None)

    def _sign(claims: Mapping[str, Any], **header: Any) -> str:
        headers = {"kid": issuer.kid, **header}
        return jwt.encode(dict(claims), key, algorithm=issuer.algorithm, headers=headers)  # type: ignore[arg-type]

    return _sign


@pytest.fixture
def verifier(issuer: LocalIssuer) -> TokenVerifier:
    return TokenVerifier(key_source=issuer.key_source(), issuer=issuer.issuer, audience=AUDIENCE)


def assert_invalid(verifier: TokenVerifier, token: str, reason: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(token)
    assert caught.value.code == "auth.invalid_token"
    assert reason in caught.value.message
    assert token not in str(caught.value)
    return caught.value


class TestValidTokens:
    def test_minted_token_gives_principal(
        self, issuer: LocalIssuer, verifier: TokenVerifier
    ) -> None:
        token = issuer.mint(
            subject="steward-7",
            roles=["data_steward", "researcher"],
            organisation="hospital-a",
            audience=AUDIENCE,
            client_id="site-cli",
            ttl_s=600,
        )
        principal = verifier.verify(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        assert principal == Principal(
            subject="steward-7",
            roles=frozenset({Role.DATA_STEWARD, Role.RESEARCHER}),
            organisation="hospital-a",
            issuer=issuer.issuer,
            client_id="site-cli",
            token_id=claims["jti"],
            expires_at=claims["exp"],
        )
        assert claims["exp"] - claims["iat"] == 600

    def test_unknown_roles_are_dropped(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        token = issuer.mint(
            subject="u",
            roles=["offline_access", "researcher", "default-roles-consortium", "ADMIN"],
            organisation=None,
            audience=AUDIENCE,
        )
        assert verifier.verify(token).roles == frozenset({Role.RESEARCHER})

    def test_missing_realm_access_means_no_roles(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, realm_access=None))
        principal = verifier.verify(token)
        assert principal.roles == frozenset()
        assert principal.organisation is None

    def test_malformed_realm_access_means_no_roles(
        self, verifier: TokenVerifier, sign: Any
    ) -> None:
        token = sign(standard_claims(verifier.issuer, realm_access={"roles": "researcher"}))
        assert verifier.verify(token).roles == frozenset()

    def test_audience_list_containing_ours_is_accepted(
        self, verifier: TokenVerifier, sign: Any
    ) -> None:
        token = sign(standard_claims(verifier.issuer, aud=["account", AUDIENCE]))
        assert verifier.verify(token).subject == "user-1"

    def test_client_id_claim_is_used_without_azp(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, client_id="agent-b"))
        assert verifier.verify(token).client_id == "agent-b"

    def test_organisation_claim_is_configurable(self, issuer: LocalIssuer, sign: Any) -> None:
        verifier = TokenVerifier(
            key_source=issuer.key_source(),
            issuer=issuer.issuer,
            audience=AUDIENCE,
            organisation_claim="organization",
        )
        single = sign(standard_claims(issuer.issuer, organization=["hospital-b"]))
        several = sign(standard_claims(issuer.issuer, organization=["hospital-a", "hospital-b"]))
        other_claim = sign(standard_claims(issuer.issuer, organisation="hospital-c"))
        assert verifier.verify(single).organisation == "hospital-b"
        assert verifier.verify(several).organisation is None
        assert verifier.verify(other_claim).organisation is None

    def test_a_token_minted_to_last_longer_than_the_maximum_is_refused(
        self, issuer: LocalIssuer, sign: Any
    ) -> None:
        """A correctly signed token that lasts too long (or whose lifetime cannot be told)
        is refused: the lifetime cap holds whoever minted the token."""
        capped = TokenVerifier(
            key_source=issuer.key_source(),
            issuer=issuer.issuer,
            audience=AUDIENCE,
            leeway_s=30,
            max_lifetime_s=3600,
        )
        now = int(time.time())
        assert capped.verify(sign(standard_claims(issuer.issuer, exp=now + 3600))).subject
        assert capped.verify(sign(standard_claims(issuer.issuer, exp=now + 3630))).subject
        with pytest.raises(AuthenticationError, match="longer than the 3600 s") as info:
            capped.verify(sign(standard_claims(issuer.issuer, exp=now + 10 * 86_400)))
        assert info.value.code == "auth.invalid_token"
        with pytest.raises(AuthenticationError, match="no 'iat' claim"):
            capped.verify(sign(standard_claims(issuer.issuer, iat=None)))
        # Without a cap (the default of the class) the same long token is accepted.
        uncapped = TokenVerifier(
            key_source=issuer.key_source(), issuer=issuer.issuer, audience=AUDIENCE
        )
        assert uncapped.verify(sign(standard_claims(issuer.issuer, exp=now + 10 * 86_400)))

    def test_recently_expired_token_is_accepted_within_leeway(
        self, issuer: LocalIssuer, verifier: TokenVerifier
    ) -> None:
        token = issuer.mint(
            subject="u",
            roles=[],
            organisation=None,
            audience=AUDIENCE,
            ttl_s=60,
            now=int(time.time()) - 70,
        )
        assert verifier.verify(token).subject == "u"

    def test_rsa_issuer(self, tmp_path: Path) -> None:
        rsa_issuer = LocalIssuer.load_or_create(tmp_path / "rsa.pem", "http://rsa.test")
        assert rsa_issuer.algorithm == "RS256"
        verifier = TokenVerifier(
            key_source=rsa_issuer.key_source(), issuer="http://rsa.test", audience=AUDIENCE
        )
        token = rsa_issuer.mint(
            subject="u", roles=["compliance_officer"], organisation=None, audience=AUDIENCE
        )
        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        assert verifier.verify(token).roles == frozenset({Role.COMPLIANCE_OFFICER})


class TestRejectedTokens:
    def test_tampered_payload(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        token = issuer.mint(subject="u", roles=["researcher"], organisation=None, audience=AUDIENCE)
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["realm_access"]["roles"] = ["consortium_admin"]
        forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
        assert_invalid(verifier, forged, "signature does not verify")

    def test_tampered_signature(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        token = issuer.mint(subject="u", roles=["researcher"], organisation=None, audience=AUDIENCE)
        header, payload, signature = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[10] ^= 0x01
        assert_invalid(verifier, f"{header}.{payload}.{b64url(bytes(raw))}", "signature")

    def test_expired(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        token = issuer.mint(
            subject="u",
            roles=["researcher"],
            organisation=None,
            audience=AUDIENCE,
            ttl_s=60,
            now=int(time.time()) - 3600,
        )
        with pytest.raises(AuthenticationError) as caught:
            verifier.verify(token)
        assert caught.value.code == "auth.expired_token"
        assert "expired at" in caught.value.message
        assert caught.value.status == 401

    def test_expired_beyond_zero_leeway(self, issuer: LocalIssuer) -> None:
        strict = TokenVerifier(
            key_source=issuer.key_source(), issuer=issuer.issuer, audience=AUDIENCE, leeway_s=0
        )
        token = issuer.mint(
            subject="u",
            roles=[],
            organisation=None,
            audience=AUDIENCE,
            ttl_s=60,
            now=int(time.time()) - 62,
        )
        with pytest.raises(AuthenticationError) as caught:
            strict.verify(token)
        assert caught.value.code == "auth.expired_token"

    def test_not_before_in_the_future(self, verifier: TokenVerifier, sign: Any) -> None:
        now = int(time.time())
        token = sign(standard_claims(verifier.issuer, nbf=now + 3600))
        assert_invalid(verifier, token, "not valid before")

    def test_issued_in_the_future(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        token = issuer.mint(
            subject="u", roles=[], organisation=None, audience=AUDIENCE, now=int(time.time()) + 600
        )
        assert_invalid(verifier, token, "issued in the future")

    def test_wrong_issuer(self, issuer: LocalIssuer, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims("https://evil.example/realms/x"))
        error = assert_invalid(verifier, token, "is not the configured issuer")
        assert error.message == (
            "token issuer 'https://evil.example/realms/x' is not the configured issuer "
            f"'{issuer.issuer}'"
        )

    def test_missing_issuer(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, iss=None))
        assert_invalid(verifier, token, "no 'iss' claim")

    def test_wrong_audience(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        token = issuer.mint(subject="u", roles=[], organisation=None, audience="other-api")
        error = assert_invalid(verifier, token, "audience")
        assert error.message == "token audience does not include 'concord-api'"

    def test_audience_list_without_ours(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, aud=["account", "broker"]))
        assert_invalid(verifier, token, "does not include 'concord-api'")

    def test_missing_exp(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, exp=None))
        assert_invalid(verifier, token, "no 'exp' claim")

    def test_id_token_is_not_an_access_token(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, typ="ID"))
        assert_invalid(verifier, token, "token is of type 'ID', not an access token")

    def test_control_characters_are_not_echoed(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims("evil\nLOG-INJECTION"))
        error = assert_invalid(verifier, token, "is not the configured issuer")
        assert "\n" not in error.message

    def test_missing_subject(self, verifier: TokenVerifier, sign: Any) -> None:
        token = sign(standard_claims(verifier.issuer, sub=None))
        assert_invalid(verifier, token, "no subject")

    def test_alg_none(self, issuer: LocalIssuer, verifier: TokenVerifier) -> None:
        header = {"alg": "none", "typ": "JWT", "kid": issuer.kid}
        token = unsigned_parts(header, standard_claims(issuer.issuer)) + "."
        assert_invalid(verifier, token, "algorithm 'none' is not accepted")

    def test_hs256_with_public_key_as_secret(
        self, issuer: LocalIssuer, verifier: TokenVerifier
    ) -> None:
        # The classic key-confusion attack: HMAC "signed" with the issuer's public key.
        public_pem = jwt.PyJWK(issuer.jwks()["keys"][0]).key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
        signing_input = unsigned_parts(header, standard_claims(issuer.issuer))
        mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        assert_invalid(verifier, f"{signing_input}.{b64url(mac)}", "'HS256' is not accepted")

    def test_algorithm_outside_configured_list(self, tmp_path: Path) -> None:
        rsa_issuer = LocalIssuer.load_or_create(tmp_path / "rsa.pem", "http://rsa.test")
        es_only = TokenVerifier(
            key_source=rsa_issuer.key_source(),
            issuer="http://rsa.test",
            audience=AUDIENCE,
            algorithms=["ES256"],
        )
        token = rsa_issuer.mint(subject="u", roles=[], organisation=None, audience=AUDIENCE)
        assert_invalid(es_only, token, "'RS256' is not accepted (accepted: ES256)")

    def test_header_alg_not_matching_key(self, issuer: LocalIssuer, tmp_path: Path) -> None:
        # An RS256 token claiming the EC key's kid must not verify against the EC key.
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        token = jwt.encode(
            standard_claims(issuer.issuer), rsa_key, algorithm="RS256", headers={"kid": issuer.kid}
        )
        verifier = TokenVerifier(
            key_source=issuer.key_source(), issuer=issuer.issuer, audience=AUDIENCE
        )
        assert_invalid(verifier, token, "does not match key")

    def test_missing_kid(
        self, issuer: LocalIssuer, verifier: TokenVerifier, issuer_key_file: Path
    ) -> None:
        key = serialization.load_pem_private_key(issuer_key_file.read_bytes(), password=None)
        token = jwt.encode(standard_claims(issuer.issuer), key, algorithm="ES256")  # type: ignore[arg-type]
        assert_invalid(verifier, token, "names no signing key (kid)")

    @pytest.mark.parametrize("garbage", ["", "   ", "not-a-jwt", "a.b.c", "e30.e30"])
    def test_garbage(self, verifier: TokenVerifier, garbage: str) -> None:
        with pytest.raises(AuthenticationError) as caught:
            verifier.verify(garbage)
        assert caught.value.code == "auth.invalid_token"

    def test_foreign_key_is_rejected(
        self, other_issuer: LocalIssuer, verifier: TokenVerifier
    ) -> None:
        token = other_issuer.mint(
            subject="u", roles=["researcher"], organisation=None, audience=AUDIENCE
        )
        error = assert_invalid(verifier, token, "does not publish")
        assert other_issuer.kid in error.message


class TestVerifierConfiguration:
    @pytest.mark.parametrize("algorithms", [["none"], ["HS256"], ["RS256", "HS512"], []])
    def test_refuses_unsafe_algorithms(self, issuer: LocalIssuer, algorithms: list[str]) -> None:
        with pytest.raises(ValueError, match="algorithm"):
            TokenVerifier(
                key_source=issuer.key_source(),
                issuer=issuer.issuer,
                audience=AUDIENCE,
                algorithms=algorithms,
            )

    def test_refuses_empty_issuer(self, issuer: LocalIssuer) -> None:
        with pytest.raises(ValueError, match="issuer"):
            TokenVerifier(key_source=issuer.key_source(), issuer="", audience=AUDIENCE)


class TestKeyLookupThroughCachingSource:
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    def make(self, issuer: LocalIssuer, fetch: CountingFetch, clock: FakeClock) -> TokenVerifier:
        source = CachingJwksSource(fetch, ttl_s=300, clock=clock)
        return TokenVerifier(key_source=source, issuer=issuer.issuer, audience=AUDIENCE)

    def mint(self, issuer: LocalIssuer) -> str:
        return issuer.mint(subject="u", roles=["researcher"], organisation=None, audience=AUDIENCE)

    def test_jwks_is_cached(self, issuer: LocalIssuer, clock: FakeClock) -> None:
        fetch = CountingFetch(issuer.jwks())
        verifier = self.make(issuer, fetch, clock)
        for _ in range(5):
            verifier.verify(self.mint(issuer))
        assert fetch.calls == 1
        clock.advance(299)
        verifier.verify(self.mint(issuer))
        assert fetch.calls == 1
        clock.advance(2)  # past the ttl
        verifier.verify(self.mint(issuer))
        assert fetch.calls == 2

    def test_unknown_kid_triggers_exactly_one_refresh(
        self, issuer: LocalIssuer, other_issuer: LocalIssuer, clock: FakeClock
    ) -> None:
        fetch = CountingFetch(issuer.jwks())
        verifier = self.make(issuer, fetch, clock)
        verifier.verify(self.mint(issuer))
        assert fetch.calls == 1
        clock.advance(11)
        assert_invalid(verifier, self.mint(other_issuer), "does not publish")
        assert fetch.calls == 2

    def test_flood_of_unknown_kids_is_rate_limited(
        self, issuer: LocalIssuer, sign: Any, clock: FakeClock
    ) -> None:
        fetch = CountingFetch(issuer.jwks())
        verifier = self.make(issuer, fetch, clock)
        verifier.verify(self.mint(issuer))
        clock.advance(60)
        for n in range(50):
            assert_invalid(verifier, sign(standard_claims(issuer.issuer), kid=f"random-{n}"), "")
            clock.advance(0.1)  # 50 tokens in 5 s
        assert fetch.calls == 2  # the first fetch, then one forced refresh in the burst
        clock.advance(10)
        assert_invalid(verifier, sign(standard_claims(issuer.issuer), kid="another"), "")
        assert fetch.calls == 3

    def test_key_rotation_is_picked_up_after_refresh(
        self, issuer: LocalIssuer, other_issuer: LocalIssuer, clock: FakeClock
    ) -> None:
        fetch = CountingFetch(issuer.jwks())
        verifier = self.make(issuer, fetch, clock)
        verifier.verify(self.mint(issuer))
        # The issuer rotates to a new key and publishes both for a while.
        fetch.jwks = {"keys": other_issuer.jwks()["keys"] + issuer.jwks()["keys"]}
        clock.advance(15)
        assert verifier.verify(self.mint(other_issuer)).subject == "u"
        assert fetch.calls == 2
        # Old tokens still verify with the new set; no further fetch.
        assert verifier.verify(self.mint(issuer)).subject == "u"
        assert fetch.calls == 2

    def test_issuer_unreachable(self, issuer: LocalIssuer, clock: FakeClock) -> None:
        fetch = CountingFetch(issuer.jwks())
        fetch.error = ConnectionRefusedError("connection refused")
        verifier = self.make(issuer, fetch, clock)
        with pytest.raises(ServiceUnavailableError) as caught:
            verifier.verify(self.mint(issuer))
        assert caught.value.code == "auth.issuer_unavailable"
        assert caught.value.status == 503


class TestCachingJwksSource:
    def test_serves_stale_keys_for_a_while_when_refresh_fails(self, issuer: LocalIssuer) -> None:
        clock = FakeClock()
        fetch = CountingFetch(issuer.jwks())
        source = CachingJwksSource(fetch, ttl_s=60, clock=clock, stale_if_error_s=120)
        assert source.get_jwks() == issuer.jwks()
        fetch.error = OSError("down")
        clock.advance(61)
        assert source.get_jwks() == issuer.jwks()
        assert fetch.calls == 2
        clock.advance(5)  # within the retry interval: no new attempt
        assert source.get_jwks() == issuer.jwks()
        assert fetch.calls == 2
        clock.advance(120)  # beyond the grace period
        with pytest.raises(ServiceUnavailableError):
            source.get_jwks()
        fetch.error = None
        clock.advance(10)
        assert source.get_jwks() == issuer.jwks()

    def test_fetch_of_malformed_document_is_issuer_failure(self) -> None:
        source = CachingJwksSource(lambda: {"nope": []}, ttl_s=60)
        with pytest.raises(ServiceUnavailableError, match="not a JWKS document") as caught:
            source.get_jwks()
        assert caught.value.code == "auth.issuer_unavailable"

    def test_callers_cannot_corrupt_the_cache(self, issuer: LocalIssuer) -> None:
        source = CachingJwksSource(lambda: issuer.jwks(), ttl_s=60)
        source.get_jwks()["keys"].clear()
        assert len(source.get_jwks()["keys"]) == 1
        static = StaticJwksSource(issuer.jwks())
        static.get_jwks()["keys"].clear()
        assert len(static.get_jwks()["keys"]) == 1


class TestLocalIssuer:
    def test_key_file_created_private_with_parent_dirs(self, tmp_path: Path) -> None:
        key_file = tmp_path / "a" / "b" / "issuer.pem"
        created = LocalIssuer.load_or_create(key_file, "http://x", key_type="EC")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert list(key_file.parent.iterdir()) == [key_file]  # no temporary file left
        reloaded = LocalIssuer.load_or_create(key_file, "http://x", key_type="RSA")
        assert reloaded.kid == created.kid
        assert reloaded.algorithm == "ES256"

    def test_kid_is_rfc7638_thumbprint(self, issuer: LocalIssuer) -> None:
        public = issuer.jwks()["keys"][0]
        assert issuer.kid == public["kid"] == jwk_thumbprint(public)
        # The worked example of RFC 7638, section 3.1.
        rfc_key = {
            "kty": "RSA",
            "n": (
                "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
                "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5"
                "v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbIS"
                "D08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kE"
                "gU8awapJzKnqDKgw"
            ),
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29",
        }
        assert jwk_thumbprint(rfc_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

    def test_jwks_has_public_keys_only(self, issuer: LocalIssuer) -> None:
        (key,) = issuer.jwks()["keys"]
        assert key["kty"] == "EC"
        assert key["use"] == "sig"
        assert key["alg"] == "ES256"
        assert "d" not in key

    def test_loads_an_existing_rsa_key(self, tmp_path: Path) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_file = tmp_path / "rsa.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        loaded = LocalIssuer.load_or_create(key_file, "http://x")
        assert (
            loaded.jwks()["keys"][0]["n"]
            == jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)["n"]
        )

    def test_refuses_other_curves(self, tmp_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        key_file = tmp_path / "p384.pem"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(ValueError, match="P-256"):
            LocalIssuer.load_or_create(key_file, "http://x")

    def test_mint_has_keycloak_claim_shape(self, issuer: LocalIssuer) -> None:
        token = issuer.mint(
            subject="s",
            roles=["site_node"],
            organisation="hospital-c",
            audience=AUDIENCE,
            client_id="site-c",
            ttl_s=120,
            now=1_700_000_000,
        )
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        assert header == {"alg": "ES256", "kid": issuer.kid, "typ": "JWT"}
        jti = claims.pop("jti")
        assert isinstance(jti, str)
        assert len(jti) >= 16
        assert claims == {
            "iss": issuer.issuer,
            "sub": "s",
            "aud": AUDIENCE,
            "exp": 1_700_000_120,
            "iat": 1_700_000_000,
            "nbf": 1_700_000_000,
            "azp": "site-c",
            "typ": "Bearer",
            "realm_access": {"roles": ["site_node"]},
            "organisation": "hospital-c",
        }

    def test_openid_configuration(self, issuer: LocalIssuer) -> None:
        document = issuer.openid_configuration()
        assert document["issuer"] == issuer.issuer
        assert document["jwks_uri"] == f"{issuer.issuer}/protocol/openid-connect/certs"
        assert document["token_endpoint"] == f"{issuer.issuer}/protocol/openid-connect/token"
        assert document["grant_types_supported"] == []  # it grants no token over HTTP
        proxied = issuer.openid_configuration("https://public.example/realms/concord/")
        assert proxied["issuer"] == issuer.issuer
        assert proxied["token_endpoint"] == (
            "https://public.example/realms/concord/protocol/openid-connect/token"
        )
