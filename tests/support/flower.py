"""Test support for real Flower processes: a throwaway CA and server certificate, free ports,
SuperNode key pairs, and a three-hospital breast-cancer world on disk."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from concord_protocol.contract import (
    EncryptionSpec,
    FederationSpec,
    ModelSpec,
    PrivacySpec,
    Purpose,
    StudyContract,
    TrainingSpec,
)
from concord_protocol.wire.format import EncryptedScheme
from consortium_server.federation.processes import TlsFiles
from consortium_server.federation.tls import make_dev_tls
from site_node.crypto import generate_study_context, public_context
from site_node.federation.approvals import ApprovalStore
from site_node.key_files import write_supernode_key
from tests.support.roster import pin_all, roster, write_site_keys

__all__ = [
    "SiteFixture",
    "approve_relayed",
    "breast_cancer_contract",
    "free_port",
    "make_site",
    "make_supernode_key",
    "make_tls",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tls(directory: Path) -> TlsFiles:
    """A CA and a server certificate for ``localhost`` / ``127.0.0.1`` (EC P-256, 1 day)."""
    return make_dev_tls(directory)


def make_supernode_key(directory: Path, name: str = "supernode") -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (as ``site-node keys init`` makes)."""
    return write_supernode_key(directory, name)


def breast_cancer_contract(
    *,
    rounds: int = 3,
    encryption: bool = True,
    epsilon: float = 8.0,
    round_timeout_s: int = 120,
    title: str = "Breast cancer federated test",
    sites: tuple[str, ...] = ("hospital-a", "hospital-b", "hospital-c"),
    scheme: EncryptedScheme = "ckks",
) -> StudyContract:
    """A small DP study of the tabular MLP on the demo breast-cancer split, its roster the
    test keys of ``sites`` (:mod:`tests.support.roster`); ``scheme``: the encryption's."""
    return StudyContract(
        roster=roster(sites),
        key_generator=min(sites),
        title=title,
        purpose=Purpose.METHOD_DEVELOPMENT,
        ethics_reference="IRB-2026-0001",
        datasets=["bc-a", "bc-b", "bc-c"],
        model=ModelSpec(name="tabular-mlp", version="1", hyperparameters={}),
        training=TrainingSpec(
            rounds=rounds, local_epochs=2, batch_size=32, learning_rate=0.1, optimizer="sgd"
        ),
        privacy=PrivacySpec(epsilon=epsilon, delta=1e-5, max_grad_norm=1.0),
        federation=FederationSpec(min_sites=3, round_timeout_s=round_timeout_s),
        encryption=EncryptionSpec(enabled=encryption, scheme=scheme),
    )


@dataclass(frozen=True)
class SiteFixture:
    """One demo hospital on disk."""

    site_id: str
    index: int
    state_dir: Path
    datasets_file: Path


def make_site(root: Path, index: int, *, dataset_id: str | None = None) -> SiteFixture:
    """A site state dir with a datasets file for the demo breast-cancer split ``index``."""
    site_id = f"hospital-{'abcdefgh'[index]}"
    state = root / site_id
    state.mkdir(parents=True, exist_ok=True)
    datasets = state / "datasets.yaml"
    ds_id = dataset_id or f"bc-{'abcdefgh'[index]}"
    datasets.write_text(
        yaml.safe_dump(
            [{"id": ds_id, "kind": "demo_breast_cancer", "site_index": index, "n_sites": 3}]
        )
    )
    write_site_keys(state, site_id)
    return SiteFixture(site_id, index, state, datasets)


def approve_relayed(sites: list[SiteFixture], study: dict[str, Any], secret: bytes) -> None:
    """Approve the server's ``study`` (its JSON) at every site, with the key relayed to it."""
    contract = StudyContract.model_validate(study["contract"])
    for site in sites:
        pin_all(site.state_dir, site.site_id, contract.site_ids)
        store = ApprovalStore(site.state_dir)
        store.approve(study["id"], contract, study["contract_hash"])
        store.save_study_key(study["id"], secret, sender_id=sites[0].site_id)


def approve_everywhere(
    sites: list[SiteFixture], study_id: str, contract: StudyContract
) -> bytes | None:
    """Approve ``contract`` at every site and give each the study key; the public context."""
    secret = generate_study_context() if contract.encryption.enabled else None
    for site in sites:
        pin_all(site.state_dir, site.site_id, contract.site_ids)
        store = ApprovalStore(site.state_dir)
        store.approve(study_id, contract, contract.contract_hash())
        if secret is not None:
            store.save_study_key(study_id, secret, sender_id=sites[0].site_id)
    return public_context(secret) if secret is not None else None
