"""``consortium study`` and ``consortium catalogue``: researchers' and stewards' commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from consortium_server.cli.common import api, console, fail, print_json, read_document, state

study_app = typer.Typer(help="Submit studies, follow them, and decide on them for your site.")
catalogue_app = typer.Typer(help="Browse the dataset catalogue.")

STATE_STYLE = {
    "awaiting_approvals": "yellow",
    "approved": "green",
    "running": "cyan",
    "completed": "green",
    "released": "bold green",
    "rejected": "red",
    "failed": "red",
    "aborted": "dim",
}


def _state(value: str) -> str:
    return f"[{STATE_STYLE.get(value, 'white')}]{value}[/]"


def show_study(study: dict[str, Any]) -> None:
    """Print a study: state, hash, each site's decision, and history."""
    if state.as_json:
        print_json(study)
        return
    console.print(f"[bold]{study['title']}[/]  ({study['id']})")
    console.print(f"state:         {_state(study['state'])}")
    if study.get("state_reason"):
        console.print(f"reason:        {study['state_reason']}")
    console.print(f"contract hash: [bold]{study['contract_hash']}[/]")
    console.print(f"owner:         {study['owner_subject']} ({study.get('owner_organisation')})")
    table = Table(title="Site decisions", show_lines=False)
    for column in ("site", "decision", "by", "when", "reason"):
        table.add_column(column)
    for site in study["sites"]:
        table.add_row(
            site["site_id"],
            site["decision"] or "[yellow]pending[/]",
            site["decided_by"] or "",
            (site["decided_at"] or "")[:19],
            site["reason"] or "",
        )
    console.print(table)


@study_app.command("submit")
def submit(
    path: Annotated[Path, typer.Argument(help="Study contract (YAML or JSON), `-` for stdin.")],
) -> None:
    """Submit a study contract. Exits 2 if the policy rejected it (reasons are printed)."""
    contract = read_document(path)
    with api() as client:
        study = client.submit_study(contract)
    show_study(study)
    if study["state"] == "rejected":
        raise typer.Exit(2)


@study_app.command("status")
def status(study_id: Annotated[str, typer.Argument(help="Study id.")]) -> None:
    """Show a study's state, contract hash, site decisions."""
    with api() as client:
        show_study(client.get_study(study_id))


@study_app.command("list")
def list_(
    state_filter: Annotated[
        str | None, typer.Option("--state", help="Only studies in this state.")
    ] = None,
) -> None:
    """List the studies you may see."""
    with api() as client:
        studies = client.list_studies(state=state_filter)
    if state.as_json:
        print_json(studies)
        return
    table = Table(title=f"{len(studies)} studies")
    for column in ("id", "title", "state", "owner", "updated"):
        table.add_column(column)
    for study in studies:
        table.add_row(
            study["id"],
            study["title"],
            _state(study["state"]),
            study["owner_subject"],
            study["updated_at"][:19],
        )
    console.print(table)


def _decide(
    study_id: str, site: str, decision: str, reason: str, expected_hash: str | None, yes: bool
) -> None:
    with api() as client:
        study = client.get_study(study_id)
        if expected_hash and expected_hash != study["contract_hash"]:
            fail(
                f"the study's contract hash is {study['contract_hash']}, not {expected_hash}",
                hint="The contract changed since you reviewed it: review it again.",
            )
        if not expected_hash and not yes:
            show_study(study)
            console.print_json(data=study["contract"])
            if not typer.confirm(f"{decision.capitalize()} contract {study['contract_hash']}?"):
                raise typer.Exit(1)
        result = client.decide(
            study_id,
            site_id=site,
            contract_hash=study["contract_hash"],
            decision=decision,
            reason=reason,
        )
    show_study(result)


@study_app.command("approve")
def approve(
    study_id: Annotated[str, typer.Argument(help="Study id.")],
    site: Annotated[str, typer.Option(help="Your site's id.")],
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    contract_hash: Annotated[
        str | None, typer.Option("--hash", help="The contract hash you reviewed.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Approve the hash shown, no prompt.")] = False,
) -> None:
    """Approve a study for your site (data steward). Binds to the exact contract hash."""
    _decide(study_id, site, "approved", reason, contract_hash, yes)


@study_app.command("decline")
def decline(
    study_id: Annotated[str, typer.Argument(help="Study id.")],
    site: Annotated[str, typer.Option(help="Your site's id.")],
    reason: Annotated[str, typer.Option(help="Why (required, recorded).")],
    yes: Annotated[bool, typer.Option("--yes", help="No prompt.")] = False,
) -> None:
    """Decline a study for your site (data steward). One decline rejects the study."""
    _decide(study_id, site, "declined", reason, None, yes)


@study_app.command("abort")
def abort(
    study_id: Annotated[str, typer.Argument(help="Study id.")],
    reason: Annotated[str, typer.Option(help="Why (recorded).")],
) -> None:
    """Stop a study (its owner or a consortium admin)."""
    with api() as client:
        show_study(client.abort_study(study_id, reason))


@catalogue_app.command("list")
def catalogue_list(
    site: Annotated[str | None, typer.Option(help="Only this site's datasets.")] = None,
    purpose: Annotated[str | None, typer.Option(help="Only datasets allowing this.")] = None,
) -> None:
    """List the datasets sites have published (metadata only)."""
    with api() as client:
        datasets = client.list_datasets(site_id=site, purpose=purpose)
    if state.as_json:
        print_json(datasets)
        return
    table = Table(title=f"{len(datasets)} datasets")
    for column in ("id", "site", "modality", "task", "records", "purposes", "ε/study", "HE"):
        table.add_column(column)
    for d in datasets:
        table.add_row(
            d["id"],
            d["site_id"],
            d["modality"],
            d["task"],
            str(d["record_count"]),
            ", ".join(d["allowed_purposes"]),
            f"{d['max_epsilon_per_study']:g}",
            "required" if d["requires_encryption"] else "optional",
        )
    console.print(table)


@catalogue_app.command("publish")
def catalogue_publish(
    path: Annotated[Path, typer.Argument(help="Dataset metadata (YAML or JSON).")],
) -> None:
    """Publish a dataset's metadata for your site (data steward or site node)."""
    with api() as client:
        dataset = client.publish_dataset(read_document(path))
    if state.as_json:
        print_json(dataset)
    else:
        console.print(f"[green]published[/] {dataset['id']} for {dataset['site_id']}")
