"""Where the verifier gets the issuer's public signing keys (a JWKS document).

A :class:`JwksSource` hands out the issuer's JSON Web Key Set. Two implementations:

* :class:`StaticJwksSource` for keys known in-process (the embedded local issuer, tests);
* :class:`CachingJwksSource` around a fetch function (Keycloak's ``certs`` endpoint): the
  set is cached for ``ttl_s`` seconds, and a verifier that meets an unknown ``kid`` may ask
  for a forced refresh, which is rate-limited so that a flood of tokens with made-up key
  ids cannot turn into a flood of requests to the issuer.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from consortium_server.errors import ServiceUnavailableError

__all__ = [
    "DEFAULT_MIN_REFRESH_INTERVAL_S",
    "CachingJwksSource",
    "JwksSource",
    "StaticJwksSource",
]

logger = logging.getLogger(__name__)

#: Minimum time between two fetches of the key set (Keycloak adapters use the same default).
DEFAULT_MIN_REFRESH_INTERVAL_S = 10.0


@runtime_checkable
class JwksSource(Protocol):
    """Provides the issuer's JSON Web Key Set (``{"keys": [...]}``)."""

    def get_jwks(self, *, force_refresh: bool = False) -> dict[str, Any]:
        """Return the current key set.

        ``force_refresh`` asks for a fresh copy from the issuer (a token names a key id that
        the cached set does not contain). Implementations may ignore it or rate-limit it.
        Raises :class:`~consortium_server.errors.ServiceUnavailableError` (code
        ``auth.issuer_unavailable``) when the keys cannot be obtained.
        """
        ...


def _checked_jwks(jwks: object, *, origin: str) -> dict[str, Any]:
    """Return ``jwks`` if it looks like a JWKS document, else raise ``ValueError``."""
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise ValueError(f"{origin} is not a JWKS document (expected an object with a 'keys' list)")
    if not all(isinstance(key, Mapping) for key in jwks["keys"]):
        raise ValueError(f"{origin} has a 'keys' entry that is not an object")
    return copy.deepcopy(dict(jwks))


class StaticJwksSource:
    """A fixed key set; ``force_refresh`` has nothing to refresh and is ignored."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._jwks = _checked_jwks(jwks, origin="the static key set")

    def get_jwks(self, *, force_refresh: bool = False) -> dict[str, Any]:
        """Return (a copy of) the fixed key set."""
        return copy.deepcopy(self._jwks)

    def __repr__(self) -> str:
        kids = [key.get("kid") for key in self._jwks["keys"]]
        return f"StaticJwksSource(kids={kids!r})"


class CachingJwksSource:
    """Caches the key set returned by ``fetch`` and refreshes it when it gets old.

    * The first call fetches. Later calls return the cached set until ``ttl_s`` seconds have
      passed since the last successful fetch, then fetch again.
    * ``force_refresh=True`` fetches again, but never sooner than ``min_refresh_interval_s``
      (about 10 s) after the previous fetch: a burst of tokens with random ``kid`` values
      costs the issuer at most one request per interval.
    * If a scheduled refresh fails while a cached set exists, the cached set keeps being
      served for up to ``stale_if_error_s`` seconds past its expiry (retrying at most once
      per ``min_refresh_interval_s``), so a short identity-provider outage does not reject
      tokens signed with keys we already know. After that, and whenever there is nothing
      cached, a failing fetch raises ``ServiceUnavailableError(code="auth.issuer_unavailable")``.

    ``fetch`` may raise ``ServiceUnavailableError`` itself (with a precise message); any other
    exception is wrapped into one. Thread-safe: concurrent callers share one fetch.
    """

    def __init__(
        self,
        fetch: Callable[[], Mapping[str, Any]],
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        min_refresh_interval_s: float = DEFAULT_MIN_REFRESH_INTERVAL_S,
        stale_if_error_s: float = 300.0,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if min_refresh_interval_s < 0 or stale_if_error_s < 0:
            raise ValueError("min_refresh_interval_s and stale_if_error_s must not be negative")
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._min_refresh_interval_s = min_refresh_interval_s
        self._stale_if_error_s = stale_if_error_s
        self._lock = threading.Lock()
        self._jwks: dict[str, Any] | None = None
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch attempt, successful or not

    def get_jwks(self, *, force_refresh: bool = False) -> dict[str, Any]:
        """Return the cached key set, fetching it first if needed (see the class docstring)."""
        with self._lock:
            now = self._clock()
            if self._jwks is None or self._fetched_at is None:
                return self._refresh(now)
            if force_refresh and self._may_attempt(now):
                return self._refresh(now)
            age = now - self._fetched_at
            if age < self._ttl_s:
                return copy.deepcopy(self._jwks)
            # Expired. Retry unless a recent attempt failed and we are still within grace.
            within_grace = age < self._ttl_s + self._stale_if_error_s
            if not self._may_attempt(now) and within_grace:
                return copy.deepcopy(self._jwks)
            try:
                return self._refresh(now)
            except ServiceUnavailableError as error:
                if not within_grace:
                    raise
                logger.warning(
                    "identity provider key refresh failed; using cached keys (%.0f s old): %s",
                    age,
                    error.public_message(),
                )
                return copy.deepcopy(self._jwks)

    def _may_attempt(self, now: float) -> bool:
        return (
            self._attempted_at is None or now - self._attempted_at >= self._min_refresh_interval_s
        )

    def _refresh(self, now: float) -> dict[str, Any]:
        self._attempted_at = now
        try:
            fetched = self._fetch()
        except ServiceUnavailableError:
            raise
        except Exception as error:
            raise ServiceUnavailableError(
                "could not fetch the token issuer's signing keys "
                f"({type(error).__name__}: {error})",
                code="auth.issuer_unavailable",
            ) from error
        try:
            jwks = _checked_jwks(fetched, origin="the key set returned by the token issuer")
        except ValueError as error:
            raise ServiceUnavailableError(str(error), code="auth.issuer_unavailable") from error
        self._jwks = jwks
        self._fetched_at = now
        logger.debug("fetched issuer key set with %d key(s)", len(jwks["keys"]))
        return copy.deepcopy(jwks)

    def __repr__(self) -> str:
        return (
            f"CachingJwksSource(ttl_s={self._ttl_s}, "
            f"min_refresh_interval_s={self._min_refresh_interval_s})"
        )
