"""``site-node peers``, ``site-node study`` and ``site-node keys fingerprint|rotate``: whom the
site trusts, and the decisions only the site can make.

Every command reads the site's settings (``CONCORD_SITE_*``) and talks to the consortium API
with the site's credentials, but believes only what it can check: the peers' keys pinned
here, the contract's hash and roster, and the site's own policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from concord_protocol.client import ApiError, ConsortiumClient
from concord_protocol.errors import ConcordError
from concord_protocol.site_keys import format_fingerprint
from site_node.errors import SiteError
from site_node.settings import SiteSettings

if TYPE_CHECKING:
    from site_node.studies import StudyReview

__all__ = ["keys_fingerprint", "keys_rotate", "peers_app", "study_app"]

peers_app = typer.Typer(
    help="The peer sites this site trusts: their keys, pinned after confirming the "
    "fingerprint with each peer's IT out of band."
)
study_app = typer.Typer(
    help="Review a study and decide on it for this site (the decision is signed here)."
)
console = Console()
err = Console(stderr=True)


def _fail(message: str, *, status: int = 1, hint: str | None = None) -> NoReturn:
    err.print(f"[red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    raise typer.Exit(status)


def _settings() -> SiteSettings:
    from pydantic import ValidationError

    try:
        settings = SiteSettings()
    except ValidationError as exc:
        _fail(f"invalid CONCORD_SITE_* settings: {exc.error_count()} problem(s)", status=2)
    if not settings.site_id:
        _fail("the site id is not set", status=2, hint="Set CONCORD_SITE_SITE_ID.")
    return settings


@contextmanager
def _site() -> Iterator[tuple[SiteSettings, str, ConsortiumClient]]:
    """Settings, site id and an API client; every expected error becomes a clear exit."""
    from site_node.agent.loop import consortium_client
    from site_node.crypto.errors import CryptoError

    settings = _settings()
    site_id = str(settings.site_id)
    try:
        with consortium_client(settings) as api:
            yield settings, site_id, api
    except ApiError as exc:
        where = f" (request {exc.request_id})" if exc.request_id else ""
        _fail(f"the consortium server refused: {exc.code}: {exc.message}{where}")
    except SiteError as exc:
        _fail(exc.diagnostics())
    except (ConcordError, CryptoError) as exc:
        _fail(str(exc))


# --- keys ----------------------------------------------------------------------------------


def keys_fingerprint() -> None:
    """Print this site's key fingerprint: read it to a peer's IT, who pins it."""
    from site_node.crypto.errors import CryptoError
    from site_node.crypto.sealing import SiteKeyPair
    from site_node.peers import own_keys

    settings = SiteSettings()
    try:
        keys = SiteKeyPair.load(settings.keys_dir())
    except CryptoError as exc:
        _fail(str(exc), status=2, hint="Run `site-node keys init` first.")
    pinned = own_keys(settings.site_id or "this-site", keys)
    typer.echo(format_fingerprint(pinned.fingerprint))


def keys_rotate() -> None:
    """Replace this site's signing and exchange keys, signed by the old key and the new.

    The old keys are kept as <keys>/previous-*.pem until the server took the rotation;
    peers move their pins only by checking both signatures from the key they pinned.
    """
    from site_node.key_rotation import rotate_keys

    with _site() as (settings, site_id, api):
        rotation = rotate_keys(api, site_id=site_id, keys_dir=settings.keys_dir())
    console.print(
        f"[green]rotated[/] {site_id}: new fingerprint {format_fingerprint(rotation.fingerprint)}"
    )


# --- peers ---------------------------------------------------------------------------------


@peers_app.command("pin")
def peers_pin(
    site_id: Annotated[str, typer.Argument(help="The peer's site id, e.g. hospital-b.")],
    fingerprint: Annotated[
        str,
        typer.Argument(help="The fingerprint the peer's IT read to you (spaces allowed)."),
    ],
) -> None:
    """Trust a peer's keys: the directory's keys must have the fingerprint you confirmed."""
    from site_node.peers import PeerStore

    with _site() as (settings, _, api):
        try:
            entry = api.request("GET", f"/api/v1/sites/{site_id}")
        except ApiError as exc:
            if exc.status == 404:
                _fail(f"the consortium has no site {site_id!r}")
            raise
        peer = PeerStore(settings.state_dir).pin(site_id, fingerprint, entry)
    console.print(f"[green]pinned[/] {site_id}: {format_fingerprint(peer.fingerprint)}")


@peers_app.command("unpin")
def peers_unpin(site_id: Annotated[str, typer.Argument(help="The peer's site id.")]) -> None:
    """Stop trusting a peer's keys (its studies get no keys here until it is pinned again)."""
    from site_node.peers import PeerStore

    settings = _settings()
    if PeerStore(settings.state_dir).unpin(site_id):
        console.print(f"unpinned {site_id}")
    else:
        _fail(f"{site_id} is not pinned here")


@peers_app.command("list")
def peers_list(
    offline: Annotated[
        bool, typer.Option("--offline", help="Only the local pins; do not ask the server.")
    ] = False,
) -> None:
    """The pinned peers, and whether the consortium's directory still agrees with each."""
    from concord_protocol.site_keys import site_key_fingerprint
    from site_node.peers import PeerStore

    settings = _settings()
    peers = PeerStore(settings.state_dir).all()
    published: dict[str, str] = {}
    if not offline:
        with _site() as (_, _, api):
            for entry in api.list_sites():
                published[str(entry["id"])] = site_key_fingerprint(
                    str(entry["signing_public_key"]), str(entry["exchange_public_key"])
                )
    table = Table(title=f"Peers pinned at {settings.site_id}")
    for column in ("site", "fingerprint", "pinned", "via", "directory"):
        table.add_column(column)
    for site_id, peer in peers.items():
        if offline:
            state = "-"
        elif site_id not in published:
            state = "[yellow]not listed[/]"
        elif published[site_id] == peer.fingerprint:
            state = "[green]agrees[/]"
        else:
            state = "[red]differs (agent follows signed rotations only)[/]"
        table.add_row(
            site_id, format_fingerprint(peer.fingerprint), peer.pinned_at, peer.via, state
        )
    console.print(table)


@peers_app.command("export-keys")
def peers_export_keys(
    out: Annotated[
        Path | None,
        typer.Argument(help="File to write (JSON); without it, print to standard output."),
    ] = None,
) -> None:
    """Write the signing keys this site trusts (its own and every pinned peer's, with the
    keys each used before a rotation) as the site-keys file of `consortium audit verify
    --site-keys`: give it to the compliance officer, who then checks cosignatures with keys
    the hospitals confirmed, not the server's."""
    import json

    from concord_protocol.audit.trusted_keys import write_site_keys
    from site_node.audit_verify import trusted_site_keys
    from site_node.crypto.errors import CryptoError
    from site_node.crypto.sealing import SiteKeyPair

    settings = _settings()
    assert settings.site_id is not None  # _settings refuses a missing site id
    try:
        keys = SiteKeyPair.load(settings.keys_dir())
    except CryptoError as exc:
        _fail(str(exc), status=2, hint="Run `site-node keys init` first.")
    trusted = trusted_site_keys(settings.state_dir, settings.site_id, keys, settings.keys_dir())
    if out is None:
        typer.echo(json.dumps(dict(sorted(trusted.items())), indent=1))
        return
    write_site_keys(out, trusted)
    err.print(f"[green]wrote[/] {out} ({len(trusted)} sites)")


# --- studies -------------------------------------------------------------------------------


def _review(
    settings: SiteSettings, site_id: str, api: ConsortiumClient, study_id: str
) -> StudyReview:
    from site_node.crypto.sealing import SiteKeyPair
    from site_node.peers import PeerStore
    from site_node.site_policy import site_engine
    from site_node.studies import review_study

    return review_study(
        api,
        study_id,
        site_id=site_id,
        keys=SiteKeyPair.load(settings.keys_dir()),
        peers=PeerStore(settings.state_dir),
        engine=site_engine(settings.policy_dir, site_id=site_id),
    )


@study_app.command("show")
def study_show(study_id: Annotated[str, typer.Argument(help="The study id.")]) -> None:
    """Fetch a study and check it here: hash, roster against pinned peers, site policy."""
    with _site() as (settings, site_id, api):
        review = _review(settings, site_id, api, study_id)
    contract = review.contract
    console.print(f"[bold]{review.study_id}[/] ({review.state})")
    console.print(f"contract hash: {review.contract_hash}")
    if contract is not None:
        console.print(
            f"{contract.title} | purpose {contract.purpose.value} | model "
            f"{contract.model.name}@{contract.model.version} | {contract.training.rounds} rounds"
            f" | epsilon {contract.privacy.epsilon} | encryption "
            f"{'on' if contract.encryption.enabled else 'OFF'} | key generator "
            f"{contract.key_generator}"
        )
        if contract.preprocessing.steps:
            console.print(f"preprocessing: {contract.preprocessing.describe()}")
        table = Table(title="Roster")
        for column in ("site", "key fingerprint", "max examples", "decision"):
            table.add_column(column)
        decisions = {d.site_id: d for d in review.peers}
        for member in contract.roster:
            d = decisions.get(member.site_id)
            shown = "-" if d is None or d.decision is None else d.decision
            if d is not None and d.decision is not None:
                shown += " [green](signature verified)[/]" if d.verified else f" [red]({d.note})[/]"
            table.add_row(
                member.site_id,
                format_fingerprint(member.key_fingerprint)[:39] + "…",
                str(member.max_examples),
                shown,
            )
        console.print(table)
    if review.problems:
        console.print("[red]This site cannot approve it:[/]")
        for problem in review.problems:
            console.print(f"  - {problem.code}: {problem.message}")
        raise typer.Exit(1)
    console.print(
        f"[green]Approvable here.[/] Approve with: site-node study approve {review.study_id} "
        f"--hash {review.contract_hash} --reason '...'"
    )


def _decide(
    study_id: str, contract_hash: str, reason: str, decision: Literal["approved", "declined"]
) -> None:
    from site_node.crypto.sealing import SiteKeyPair
    from site_node.federation.approvals import ApprovalStore
    from site_node.studies import StudyDecisionError, decide_study

    with _site() as (settings, site_id, api):
        review = _review(settings, site_id, api, study_id)
        try:
            _, posted = decide_study(
                api,
                review,
                decision=decision,
                contract_hash=contract_hash.strip().lower(),
                reason=reason,
                site_id=site_id,
                keys=SiteKeyPair.load(settings.keys_dir()),
                store=ApprovalStore(settings.state_dir),
            )
        except StudyDecisionError as exc:
            _fail(exc.diagnostics())
    if posted:
        console.print(f"[green]{decision}[/] {study_id} (signed by {site_id}, recorded)")
    else:
        console.print(
            f"[yellow]{decision}[/] {study_id} (signed and kept here; the server was not "
            "reachable: the agent posts it on its next pass)"
        )


@study_app.command("approve")
def study_approve(
    study_id: Annotated[str, typer.Argument(help="The study id.")],
    contract_hash: Annotated[
        str, typer.Option("--hash", help="The contract hash you reviewed (study show).")
    ],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Approve the study's exact contract for this site: checked, signed, stored, posted."""
    _decide(study_id, contract_hash, reason, "approved")


@study_app.command("decline")
def study_decline(
    study_id: Annotated[str, typer.Argument(help="The study id.")],
    contract_hash: Annotated[
        str, typer.Option("--hash", help="The contract hash you reviewed (study show).")
    ],
    reason: Annotated[str, typer.Option(help="Why (required).")],
) -> None:
    """Decline the study for this site (signed, stored, posted)."""
    _decide(study_id, contract_hash, reason, "declined")
