"""``consortium study`` and ``consortium catalogue``: researchers' and stewards' commands."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from concord_protocol.audit.trusted_keys import SiteKeysError, load_site_keys
from concord_protocol.contract import contract_from_mapping
from concord_protocol.errors import ReleasedModelError
from concord_protocol.model_file import check_released_file
from consortium_server.cli.common import api, console, fail, print_json, read_document, state

study_app = typer.Typer(
    help="Submit studies, follow them, and check the sites' signed decisions (sites decide "
    "with `site-node study approve`)."
)
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


def _keys_by_fingerprint(client: Any, site_id: str) -> dict[str, str]:
    """Every signing key the consortium has held for ``site_id``, by key fingerprint."""
    from concord_protocol.site_keys import KeyRotation, site_key_fingerprint

    site = client.request("GET", f"/api/v1/sites/{site_id}")
    keys = {
        site_key_fingerprint(site["signing_public_key"], site["exchange_public_key"]): site[
            "signing_public_key"
        ]
    }
    for row in client.request("GET", f"/api/v1/sites/{site_id}/keys/history"):
        rotation = KeyRotation.model_validate(row["rotation"])
        keys[rotation.fingerprint] = rotation.signing_public_key
    return keys


@study_app.command("decisions")
def decisions(study_id: Annotated[str, typer.Argument(help="Study id.")]) -> None:
    """Check every site's signed decision on a study (anyone may: the signatures, not the
    server, say who approved). Exit 1 if a recorded decision does not verify.

    Each decision must be signed, for the study's exact contract hash, by the key whose
    fingerprint the contract's roster names for that site. Decisions are made at the
    sites (`site-node study approve`), not here.
    """
    from concord_protocol.contract import StudyContract
    from concord_protocol.site_decisions import SignedDecision, SiteDecision
    from concord_protocol.site_keys import SignatureError

    with api() as client:
        study = client.get_study(study_id)
        contract = StudyContract.model_validate(study["contract"])
        shown = {s["site_id"]: s for s in study["sites"]}
        rows: list[tuple[str, str, str]] = []
        bad = 0
        for member in contract.roster:
            row = shown.get(member.site_id, {})
            if not row.get("decision"):
                rows.append((member.site_id, "-", "no decision yet"))
                continue
            key = _keys_by_fingerprint(client, member.site_id).get(member.key_fingerprint)
            verdict = "[green]signature verified[/]"
            try:
                if key is None:
                    raise SignatureError("no key with the roster's fingerprint is on record")
                if row.get("contract_hash") != contract.contract_hash():
                    raise SignatureError("decided on another contract hash")
                SignedDecision(
                    decision=SiteDecision(
                        study_id=study["id"],
                        contract_hash=row["contract_hash"],
                        site_id=member.site_id,
                        decision=row["decision"],
                        reason=row.get("reason") or "",
                        decided_at=row.get("signed_at") or "",
                    ),
                    signature=row.get("signature") or "",
                ).verify(key)
            except (SignatureError, ValueError) as exc:
                bad += 1
                verdict = f"[red]NOT VERIFIED[/]: {exc}"
            rows.append((member.site_id, row["decision"], verdict))
    if state.as_json:
        print_json([{"site_id": r[0], "decision": r[1], "check": r[2]} for r in rows])
    else:
        table = Table(title=f"Signed decisions on {study_id} ({contract.contract_hash()[:16]}…)")
        for column in ("site", "decision", "check"):
            table.add_column(column)
        for row_values in rows:
            table.add_row(*row_values)
        console.print(table)
    if bad:
        raise typer.Exit(1)


@study_app.command("abort")
def abort(
    study_id: Annotated[str, typer.Argument(help="Study id.")],
    reason: Annotated[str, typer.Option(help="Why (recorded).")],
) -> None:
    """Stop a study (its owner or a consortium admin)."""
    with api() as client:
        show_study(client.abort_study(study_id, reason))


@study_app.command("download")
def download(
    study_id: Annotated[str, typer.Argument(help="Study id (released).")],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the model file (default: its name, here)."),
    ] = None,
    contract: Annotated[
        Path | None,
        typer.Option(help="The contract you submitted (YAML or JSON): checked against the file."),
    ] = None,
    site_keys: Annotated[
        Path | None,
        typer.Option(
            help="The sites' signing keys, as a hospital exports them (`site-node peers "
            "export-keys`): every site's sign-off on the card must verify with them."
        ),
    ] = None,
) -> None:
    """Download a released model as a safetensors file, with its card beside it
    (``NAME.card.json``), after checking file and card agree (owner or consortium admin).

    Load it with ``site_node.training.released.load_released_model(PATH, card=CARD)``.
    """
    given = contract_from_mapping(read_document(contract)) if contract is not None else None
    try:
        keys = load_site_keys(site_keys) if site_keys is not None else None
    except SiteKeysError as exc:
        fail(str(exc))
    base = f"/api/v1/studies/{study_id}/release"
    with api() as client:
        card = client.request("GET", f"{base}/card")
        blob = client.download(f"{base}/model.safetensors")
    try:
        file = check_released_file(
            blob,
            card=card,
            contract_hash=given.contract_hash() if given is not None else None,
            model_spec=given.model if given is not None else None,
            signing_keys=keys,
        )
    except ReleasedModelError as exc:
        fail(f"{exc.message} ({exc.code})", hint="Nothing was written; tell your operator.")
    path = out if out is not None else Path(_safe_name(card["model"].get("file_name"), study_id))
    card_path = path.with_name(f"{path.name.removesuffix('.safetensors')}.card.json")
    path.write_bytes(blob)
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    if state.as_json:
        print_json(
            {"file": str(path), "card": str(card_path), "model_sha256": file.info.model_sha256}
        )
        return
    info = file.info
    console.print(
        f"[green]wrote[/] {path} ({info.spec.name} v{info.spec.version}, "
        f"{file.num_params} parameters, input {list(info.input_shape)}, "
        f"{info.num_classes} classes) and {card_path}"
    )
    checked = ["the data hash to the model hash", "the card agrees"]
    if given is not None:
        checked.append("it is your contract's model")
    if keys is not None:
        checked.append("every site signed it")
    console.print(f"model SHA-256 {info.model_sha256}: {'; '.join(checked)}")


def _safe_name(name: object, study_id: str) -> str:
    """The server's file name as a plain name in the current directory (never a path)."""
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", name):
        return name
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', study_id)[:100] or 'model'}.safetensors"


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
