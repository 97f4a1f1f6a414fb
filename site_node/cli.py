"""The ``site-node`` command: a hospital's keys, local datasets and model catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from site_node.cli_data import data_app, models_app
from site_node.settings import SiteSettings

app = typer.Typer(
    name="site-node",
    help=(
        "Concord site node: run at a hospital. Holds the site's keys, registers local "
        "datasets (metadata goes to the catalogue, data never leaves), and trains approved "
        "studies. Settings come from CONCORD_SITE_* variables."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
keys_app = typer.Typer(help="Create and show this site's keys (signing, key exchange, SuperNode).")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)

SUPERNODE_KEY_FILE = "supernode"


def _keys_dir(directory: Path | None) -> Path:
    return directory or SiteSettings().keys_dir()


@keys_app.command("init")
def keys_init(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Key directory (default <state_dir>/keys).")
    ] = None,
) -> None:
    """Create the site's Ed25519 signing key, X25519 exchange key and SuperNode EC key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from site_node.crypto.errors import CryptoError
    from site_node.crypto.sealing import SiteKeyPair

    path = _keys_dir(directory)
    try:
        SiteKeyPair.generate().save(path)
    except CryptoError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    supernode = ec.generate_private_key(ec.SECP384R1())
    private = path / SUPERNODE_KEY_FILE
    private.write_bytes(
        supernode.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    (path / f"{SUPERNODE_KEY_FILE}.pub").write_bytes(
        supernode.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    console.print(f"[green]created[/] site keys in {path}")


@keys_app.command("enrolment")
def keys_enrolment(
    site_id: Annotated[str, typer.Option(help="Site id to enrol as, e.g. hospital-a.")],
    organisation: Annotated[str, typer.Option(help="Organisation as in the site's tokens.")],
    contact: Annotated[str, typer.Option(help="Contact e-mail of hospital IT.")],
    display_name: Annotated[str | None, typer.Option(help="Name shown to members.")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="Key directory.")] = None,
) -> None:
    """Print the enrolment request (public keys only) to send to the consortium operator."""
    from site_node.crypto.sealing import SiteKeyPair

    path = _keys_dir(directory)
    keys = SiteKeyPair.load(path)
    body = {
        "id": site_id,
        "organisation": organisation,
        "display_name": display_name or organisation,
        "contact_email": contact,
        "signing_public_key": keys.signing_public_b64,
        "exchange_public_key": keys.exchange_public_b64,
        "supernode_public_key": (path / f"{SUPERNODE_KEY_FILE}.pub").read_text().strip(),
    }
    typer.echo(yaml.safe_dump(body, sort_keys=False))


def main() -> None:
    """Entry point of the ``site-node`` console script."""
    app()
