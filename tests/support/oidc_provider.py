"""Start and stop the Keycloak-shaped test OIDC provider (``tests/oidc_provider/server.mjs``).

Usage from a conftest::

    from tests.support.oidc_provider import OidcClient, running_oidc_provider

    @pytest.fixture(scope="session")
    def oidc_provider(tmp_path_factory):
        clients = [OidcClient("researcher-cli", "s3cret", roles=["researcher"])]
        with running_oidc_provider(clients, work_dir=tmp_path_factory.mktemp("oidc")) as p:
            yield p

The provider listens on a free loopback port chosen by the OS (no race between picking a port
and binding it), serves one realm, and is killed when the context exits. It needs Node.js and
``tests/oidc_provider/node_modules``; if either is missing this fails loudly (it never skips).
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PROVIDER_DIR",
    "OidcClient",
    "OidcProvider",
    "OidcProviderError",
    "running_oidc_provider",
    "start_oidc_provider",
]

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "oidc_provider"
READY_PREFIX = "CONCORD-OIDC-READY "


class OidcProviderError(RuntimeError):
    """The test OIDC provider cannot be started."""


@dataclass(frozen=True)
class OidcClient:
    """A confidential client of the test realm (client-credentials grant).

    ``roles`` end up in the token's ``realm_access.roles``, ``organisation`` in its
    ``organisation`` claim; ``access_token_ttl`` (seconds) overrides the realm default.
    The token's ``sub`` and ``azp`` are the ``client_id``.
    """

    client_id: str
    client_secret: str
    roles: Sequence[str] = ()
    organisation: str | None = None
    access_token_ttl: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The entry for the provider's clients file."""
        entry: dict[str, Any] = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "roles": list(self.roles),
            "organisation": self.organisation,
        }
        if self.access_token_ttl is not None:
            entry["access_token_ttl"] = self.access_token_ttl
        return entry


@dataclass
class OidcProvider:
    """A running provider. ``server_url`` and ``realm`` are what python-keycloak needs."""

    issuer: str
    port: int
    realm: str
    audience: str
    clients: dict[str, OidcClient]
    process: subprocess.Popen[str] = field(repr=False)
    stderr_path: Path = field(repr=False)
    scheme: str = "http"

    @property
    def server_url(self) -> str:
        """Base URL, as given to ``KeycloakOpenID(server_url=...)``."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        """What the provider wrote to stderr so far (for failure messages)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the provider process (idempotent)."""
        _stop(self.process)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _check_installed() -> str:
    node = shutil.which("node")
    if node is None:
        raise OidcProviderError(
            "Node.js (`node`) is not on PATH; the identity integration tests need it to run "
            "the test OIDC provider (tests/oidc_provider)."
        )
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise OidcProviderError(
            f"{PROVIDER_DIR / 'node_modules'} is missing: run `make test` which installs it "
            f"(or `npm ci` in {PROVIDER_DIR})."
        )
    return node


def _read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def start_oidc_provider(
    clients: Sequence[OidcClient],
    *,
    work_dir: Path | None = None,
    realm: str = "consortium",
    audience: str = "concord-api",
    access_token_ttl: int = 300,
    startup_timeout_s: float = 30.0,
    tls: tuple[Path, Path] | None = None,
) -> OidcProvider:
    """Start the provider and wait until it is listening. Call ``.stop()`` when done.

    Prefer :func:`running_oidc_provider`, which stops it for you. ``work_dir`` holds the
    clients file and the provider's stderr log (a fresh temporary directory by default).
    ``tls``: (certificate, key) PEM files; the provider then serves HTTPS.
    """
    node = _check_installed()
    if not clients:
        raise ValueError("the provider needs at least one client")
    by_id = {client.client_id: client for client in clients}
    if len(by_id) != len(clients):
        raise ValueError("client ids must be unique")
    directory = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="oidc-"))
    directory.mkdir(parents=True, exist_ok=True)
    clients_file = directory / "clients.json"
    clients_file.write_text(json.dumps({"clients": [c.as_json() for c in clients]}, indent=2))
    stderr_path = directory / "provider.stderr.log"

    command = [
        node,
        str(PROVIDER_DIR / "server.mjs"),
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--realm",
        realm,
        "--audience",
        audience,
        "--clients",
        str(clients_file),
        "--access-token-ttl",
        str(access_token_ttl),
        # If this Python process dies without cleaning up, the closed pipe stops node.
        "--exit-on-stdin-close",
    ]
    if tls is not None:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            command,
            cwd=PROVIDER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(
        target=_read_lines, args=(process.stdout, lines), name="oidc-provider-stdout", daemon=True
    ).start()

    deadline = time.monotonic() + startup_timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OidcProviderError(
                    f"the test OIDC provider did not report ready within {startup_timeout_s} s"
                )
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                process.wait(timeout=5)
                raise OidcProviderError(
                    f"the test OIDC provider exited with status {process.returncode}"
                )
            if line.startswith(READY_PREFIX):
                ready = json.loads(line[len(READY_PREFIX) :])
                return OidcProvider(
                    issuer=str(ready["issuer"]),
                    port=int(ready["port"]),
                    realm=realm,
                    audience=audience,
                    clients=by_id,
                    process=process,
                    stderr_path=stderr_path,
                    scheme="https" if tls is not None else "http",
                )
    except BaseException as error:
        _stop(process)
        if isinstance(error, OidcProviderError):
            log = stderr_path.read_text(errors="replace").strip()
            raise OidcProviderError(f"{error}; its stderr:\n{log or '(empty)'}") from None
        raise


@contextlib.contextmanager
def running_oidc_provider(
    clients: Sequence[OidcClient],
    *,
    work_dir: Path | None = None,
    realm: str = "consortium",
    audience: str = "concord-api",
    access_token_ttl: int = 300,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[OidcProvider]:
    """Context manager around :func:`start_oidc_provider` that always stops the process."""
    provider = start_oidc_provider(
        clients,
        work_dir=work_dir,
        realm=realm,
        audience=audience,
        access_token_ttl=access_token_ttl,
        tls=tls,
    )
    try:
        yield provider
    finally:
        provider.stop()
