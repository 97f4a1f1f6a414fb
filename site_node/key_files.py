"""A site's key files: Ed25519 signing and X25519 exchange keys, and the SuperNode's EC key."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from concord_protocol.private_files import write_private_file
from site_node.crypto.sealing import SiteKeyPair

__all__ = ["SUPERNODE_KEY_FILE", "init_site_keys", "write_supernode_key"]

SUPERNODE_KEY_FILE = "supernode"


def write_supernode_key(directory: Path, name: str = SUPERNODE_KEY_FILE) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format for Flower SuperNode authentication.

    Returns (private, public) paths; the private key file is created with mode 0600 (never
    wider, not even for a moment: :func:`~concord_protocol.private_files.write_private_file`).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    write_private_file(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def init_site_keys(directory: Path) -> SiteKeyPair:
    """Create all of a site's keys in ``directory`` (refuses to overwrite existing keys)."""
    keys = SiteKeyPair.generate()
    keys.save(directory)
    write_supernode_key(directory)
    return keys
