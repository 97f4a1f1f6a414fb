"""The processes of the demo: server, SuperLink, and per hospital a SuperNode and an agent."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from concord_protocol.client import ConsortiumClient
from concord_protocol.policy.engine import Decision
from concord_protocol.policy.shipped import shipped_policies
from concord_protocol.processes import (
    FlowerProcessError,
    ManagedProcess,
    flower_env,
    flwr_binary,
    spawn,
)
from consortium_server.federation.federation_token import create_token
from consortium_server.federation.processes import (
    SuperLinkHandle,
    register_supernode,
    serverapp_env,
    start_superlink,
)
from consortium_server.federation.tls import make_dev_tls
from consortium_server.identity.local_issuer import LocalIssuer
from consortium_server.settings import ServerSettings
from site_node.crypto.sealing import SiteKeyPair
from site_node.federation.processes import SuperNodeSpec, start_supernode
from site_node.key_files import SUPERNODE_KEY_FILE, init_site_keys, write_supernode_key
from site_node.site_policy import load_site_engine

__all__ = ["DemoStack", "Hospital", "free_port", "spawn_server", "start_registered_supernode"]

RESEARCHER_ORG = "University of Leiden"
POLICIES = shipped_policies()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: The demo server's largest study-key or released-model body: real-size networks
#: (docs/operator.md, ``server.maxKeyBodyBytes``).
DEMO_MAX_UPLOAD_BYTES = 512 * 1_048_576


@dataclass
class Hospital:
    """One simulated hospital: its directory, keys, dataset and processes."""

    index: int
    letter: str
    root: Path
    keys: SiteKeyPair | None = None
    supernode: ManagedProcess | None = None
    agent: ManagedProcess | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    dataset_prefix: str = "bc"

    @property
    def site_id(self) -> str:
        return f"hospital-{self.letter}"

    @property
    def organisation(self) -> str:
        return f"Hospital {self.letter.upper()}"

    @property
    def dataset_id(self) -> str:
        return f"{self.dataset_prefix}-{self.site_id}"

    @property
    def state_dir(self) -> Path:
        return self.root / self.site_id

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def datasets_file(self) -> Path:
        return self.state_dir / "datasets.yaml"

    @property
    def policy_dir(self) -> Path:
        return self.state_dir / "policy"


class DemoStack:
    """Starts and stops everything the demo runs; every process logs to a file."""

    def __init__(self, state: Path, *, n_sites: int = 3, python_bin: Path) -> None:
        self.state = state
        self.bin = python_bin
        self.api_port = free_port()
        self.link_port = free_port()
        self.control_port = free_port()
        self.hospitals = [Hospital(i, "abcdefgh"[i], state / "sites") for i in range(n_sites)]
        self.server: ManagedProcess | None = None
        self.link: SuperLinkHandle | None = None
        self.settings = ServerSettings(
            data_dir=state / "server",
            api={"port": self.api_port},
        )
        self._issuer: LocalIssuer | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- identities -----------------------------------------------------------------------

    def token(self, subject: str, roles: list[str], organisation: str | None) -> str:
        """A token from the server's local issuer (the demo runs on the server's machine)."""
        if self._issuer is None:
            from consortium_server.identity.factory import build_local_issuer

            self._issuer = build_local_issuer(self.settings)
        return self._issuer.mint(
            subject=subject,
            roles=roles,
            organisation=organisation,
            audience=self.settings.identity.audience,
            ttl_s=6 * 3600,
        )

    def client(self, token: str) -> ConsortiumClient:
        """An API client with ``token``."""
        return ConsortiumClient(self.api_url, token, timeout_s=120)

    # -- processes ------------------------------------------------------------------------

    def prepare(self) -> None:
        """A clean state directory (a second run starts from scratch)."""
        if self.state.exists():
            shutil.rmtree(self.state)
        self.state.mkdir(parents=True)

    @property
    def token_file(self) -> Path:
        """The federation token the server and the SuperLink's ServerApps share."""
        return self.state / "serverapp-token"

    def start_superlink(self, *, restart: bool = False) -> SuperLinkHandle:
        """The SuperLink with TLS (a development CA) and SuperNode authentication, whose
        ServerApps report rounds to the server's internal API with the federation token.

        ``restart``: start it again after it stopped, with the same TLS files, port, token
        and state database (its registered SuperNodes and runs)."""
        if not restart:
            self.tls = make_dev_tls(self.state / "tls")
            create_token(self.token_file)
        self.link = start_superlink(
            self.state / "superlink",
            port=self.link_port,
            control_port=self.control_port,
            tls=self.tls,
            extra_env=serverapp_env(self.api_url, self.token_file),
        )
        return self.link

    def start_server(self) -> None:
        """``consortium server`` on the embedded defaults, pointed at the SuperLink."""
        assert self.link is not None
        env = {
            **_base_env(self.state / "server-home"),
            "CONCORD_DATA_DIR": str(self.settings.data_dir),
            "CONCORD_API__PORT": str(self.api_port),
            "CONCORD_POLICY__MEMBER_ORGANISATIONS": json.dumps([RESEARCHER_ORG]),
            # The released model is uploaded as base64 JSON, ~11 bytes per parameter: the
            # 64 MiB default holds 5.8M parameters, DenseNet121 (7M) needs more.
            "CONCORD_API__MAX_KEY_BODY_BYTES": str(DEMO_MAX_UPLOAD_BYTES),
            # Control (mutual TLS: the server's client certificate), not the Fleet port.
            "CONCORD_FEDERATION__SUPERLINK_ADDRESS": self.link.control_endpoint().address,
            "CONCORD_FEDERATION__ROOT_CERTIFICATES": str(self.tls.ca_cert),
            "CONCORD_FEDERATION__CLIENT_CERTIFICATE": str(self.tls.client_cert),
            "CONCORD_FEDERATION__CLIENT_PRIVATE_KEY": str(self.tls.client_key),
            "CONCORD_FEDERATION__SERVERAPP_TOKEN_FILE": str(self.token_file),
        }
        self.server = spawn_server(
            self.bin, env, url=self.api_url, log_path=self.state / "server.log"
        )

    def init_keys(self, hospital: Hospital) -> SiteKeyPair:
        """``site-node keys init`` for the hospital."""
        hospital.keys = init_site_keys(hospital.keys_dir)
        return hospital.keys

    def register_supernode(self, hospital: Hospital) -> None:
        """Register the hospital's SuperNode key with the SuperLink."""
        assert self.link is not None
        register_supernode(
            self.link, hospital.keys_dir / f"{SUPERNODE_KEY_FILE}.pub", name=hospital.site_id
        )

    def start_supernode(self, hospital: Hospital) -> None:
        """The hospital's Flower SuperNode (TLS, authenticated, guarded ClientApp runner)."""
        assert self.link is not None
        hospital.supernode = start_supernode(
            SuperNodeSpec(
                site_id=hospital.site_id,
                state_dir=hospital.state_dir,
                datasets_file=hospital.datasets_file,
                superlink_address=self.link.address,
                root_certificates=self.tls.ca_cert,
                auth_private_key=hospital.keys_dir / SUPERNODE_KEY_FILE,
                runtime_port=free_port(),
            )
        )

    def start_agent(self, hospital: Hospital, *, server_head_key: str) -> None:
        """``site-node run``: syncs approvals, exchanges study keys, witnesses the log."""
        env = {
            **_base_env(hospital.state_dir / "home"),
            "CONCORD_SITE_SITE_ID": hospital.site_id,
            "CONCORD_SITE_ORGANISATION": hospital.organisation,
            "CONCORD_SITE_STATE_DIR": str(hospital.state_dir),
            "CONCORD_SITE_API_URL": self.api_url,
            "CONCORD_SITE_TOKEN": hospital.tokens["node"],
            "CONCORD_SITE_POLL_INTERVAL_S": "1",
            "CONCORD_SITE_DATASETS_FILE": str(hospital.datasets_file),
            "CONCORD_SITE_SERVER_HEAD_KEY": server_head_key,
        }
        hospital.agent = spawn(
            f"agent-{hospital.site_id}",
            [str(self.bin / "site-node"), "run"],
            env=env,
            log_path=hospital.state_dir / "agent.log",
        )

    # -- what a hospital's IT and data steward do ----------------------------------------

    def head_key(self) -> str:
        """The server's tree-head public key (read from its key file: the same machine)."""
        from consortium_server.audit.signer import TreeHeadSigner

        return TreeHeadSigner.load_or_create(self.settings.audit_head_key_file()).public_key_b64

    def bring_up(
        self,
        hospital: Hospital,
        admin: ConsortiumClient,
        *,
        dataset: dict[str, Any],
        governance: dict[str, Any],
        head_key: str,
        epsilon_cap: float | None = None,
    ) -> dict[str, Any]:
        """Bring a hospital into the consortium: its keys, enrolment by ``admin`` (which
        registers its SuperNode key with the SuperLink), ``dataset`` (a DatasetConfig)
        published with ``governance``, its site policy (the base permit, plus a per-study
        epsilon cap when given), its SuperNode and site agent started. Returns the published
        catalogue entry.
        """

        keys = self.init_keys(hospital)
        admin.enrol_site(
            {
                "id": hospital.site_id,
                "organisation": hospital.organisation,
                "display_name": hospital.organisation,
                "contact_email": f"it@{hospital.site_id}.example.org",
                "signing_public_key": keys.signing_public_b64,
                "exchange_public_key": keys.exchange_public_b64,
                "supernode_public_key": (hospital.keys_dir / "supernode.pub").read_text(),
            }
        )
        hospital.tokens["steward"] = self.token(
            f"steward-{hospital.letter}", ["data_steward"], hospital.organisation
        )
        hospital.tokens["node"] = self.token(
            f"service-account-{hospital.site_id}", ["site_node"], hospital.organisation
        )
        hospital.datasets_file.write_text(yaml.safe_dump([]))
        entry = self.publish_dataset(hospital, dataset, governance)
        hospital.policy_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(POLICIES / "sites" / "00-base.cedar", hospital.policy_dir / "00-base.cedar")
        if epsilon_cap is not None:
            template = (POLICIES / "sites" / "epsilon-cap.cedar").read_text()
            (hospital.policy_dir / "epsilon-cap.cedar").write_text(
                template.replace("2.0", f"{epsilon_cap:.1f}")
            )
        self.start_supernode(hospital)
        self.start_agent(hospital, server_head_key=head_key)
        return entry

    def publish_dataset(
        self, hospital: Hospital, dataset: dict[str, Any], governance: dict[str, Any]
    ) -> dict[str, Any]:
        """Add ``dataset`` (a DatasetConfig) to the hospital's datasets file and publish its
        catalogue entry with ``governance`` as the hospital's steward (the SuperNode reads
        the file at each round, so a running hospital can take part in a study of it)."""
        from site_node.data.publish import catalogue_entry
        from site_node.data.registry import DatasetConfig

        entry = catalogue_entry(DatasetConfig.model_validate(dataset), governance)
        existing = yaml.safe_load(hospital.datasets_file.read_text()) or []
        hospital.datasets_file.write_text(yaml.safe_dump([*existing, dataset]))
        self.client(hospital.tokens["steward"]).publish_dataset(entry)
        return entry

    def pin_peers(self) -> dict[str, str]:
        """Each hospital's IT pins every other hospital (``site-node peers pin``), with the
        fingerprint the peer itself shows (``site-node keys fingerprint``): here the call
        between two hospitals' IT is a read of the peer's key files. Returns the
        fingerprints by site id."""
        from site_node.peers import PeerStore, own_keys

        fingerprints = {
            h.site_id: own_keys(h.site_id, h.keys).fingerprint
            for h in self.hospitals
            if h.keys is not None
        }
        for hospital in self.hospitals:
            api = self.client(hospital.tokens["node"])
            store = PeerStore(hospital.state_dir)
            for site_id, fingerprint in fingerprints.items():
                if site_id != hospital.site_id:
                    store.pin(site_id, fingerprint, api.request("GET", f"/api/v1/sites/{site_id}"))
        return fingerprints

    def approve(self, hospital: Hospital, study: dict[str, Any], *, reason: str) -> Decision:
        """The hospital approves the study as ``site-node study approve`` does: the site
        checks the contract's hash, its roster against the pinned peers, the consortium's
        and its own policy, then signs the decision, stores it and posts it. Raises if the
        site cannot approve."""
        from site_node.federation.approvals import ApprovalStore
        from site_node.peers import PeerStore
        from site_node.studies import decide_study, review_study

        if hospital.keys is None:
            raise RuntimeError(f"{hospital.site_id} has no keys")
        api = self.client(hospital.tokens["node"])
        review = review_study(
            api,
            study["id"],
            site_id=hospital.site_id,
            keys=hospital.keys,
            peers=PeerStore(hospital.state_dir),
            engine=load_site_engine(hospital.policy_dir, site_id=hospital.site_id),
        )
        if not review.approvable or review.policy is None:
            raise RuntimeError(
                f"{hospital.site_id} cannot approve the study: "
                + "; ".join(p.message for p in review.problems)
            )
        decide_study(
            api,
            review,
            decision="approved",
            contract_hash=study["contract_hash"],
            reason=reason,
            site_id=hospital.site_id,
            keys=hospital.keys,
            store=ApprovalStore(hospital.state_dir),
        )
        return review.policy

    def stop(self) -> None:
        """Stop every process (agents, SuperNodes, server, SuperLink)."""
        for hospital in self.hospitals:
            for proc in (hospital.agent, hospital.supernode):
                if proc is not None:
                    proc.stop()
        if self.server is not None:
            self.server.stop()
        if self.link is not None:
            self.link.stop()

    @contextmanager
    def running(self) -> Iterator[DemoStack]:
        """Stop everything on exit, whatever happened."""
        try:
            yield self
        finally:
            self.stop()


def start_registered_supernode(
    link: SuperLinkHandle, ca_cert: Path, *, site_id: str, state_dir: Path, datasets_file: Path
) -> ManagedProcess:
    """A site's SuperNode on loopback: a fresh key in ``state_dir/keys``, registered with
    ``link`` (what enrolment does for an enrolled site), and the SuperNode started."""
    private, public = write_supernode_key(state_dir / "keys")
    register_supernode(link, public, name=site_id)
    return start_supernode(
        SuperNodeSpec(
            site_id=site_id,
            state_dir=state_dir,
            datasets_file=datasets_file,
            superlink_address=link.address,
            root_certificates=ca_cert,
            auth_private_key=private,
            runtime_port=free_port(),
        )
    )


def spawn_server(
    python_bin: Path, env: dict[str, str], *, url: str, log_path: Path, timeout_s: float = 90
) -> ManagedProcess:
    """Start ``consortium server`` with ``env`` and wait until ``url``/readyz answers 200.

    Stops it and raises :class:`FlowerProcessError` (with the log's tail) if it exits or is
    not ready within ``timeout_s``.
    """
    proc = spawn(
        "consortium-server", [str(python_bin / "consortium"), "server"], env=env, log_path=log_path
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise FlowerProcessError("the consortium server exited", proc.log_tail())
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.stop()
    raise FlowerProcessError("the consortium server did not become ready", proc.log_tail())


def _base_env(home: Path) -> dict[str, str]:
    """A child's environment: the venv first on PATH, its own HOME, Flower's variables."""
    return flower_env(home)


def flwr_available() -> bool:
    """True if the Flower executables are installed next to this Python."""
    try:
        flwr_binary("flower-superlink")
    except FlowerProcessError:
        return False
    return True


def summarise(body: Any) -> str:
    """A short JSON rendering for logs."""
    return json.dumps(body, default=str)[:300]
