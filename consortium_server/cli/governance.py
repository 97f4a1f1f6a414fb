"""``consortium policy``, ``consortium budget`` and ``consortium audit``: checking studies
against the policies, publishing policy sets, reading budgets, verifying the audit log."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from consortium_server.cli.common import (
    api,
    console,
    err_console,
    fail,
    print_json,
    read_document,
    state,
)

policy_app = typer.Typer(help="Dry-run studies against the data-use policies; publish policy sets.")
budget_app = typer.Typer(help="Privacy budgets of datasets (epsilon spent, reserved, remaining).")
audit_app = typer.Typer(help="The tamper-evident audit log: heads, export, verification.")


def show_decision(decision: dict[str, Any]) -> None:
    """Print a policy decision with every reason."""
    if state.as_json:
        print_json(decision)
        return
    verdict = "[bold green]ALLOW[/]" if decision["allowed"] else "[bold red]DENY[/]"
    console.print(f"{verdict}  (policy set {decision['policy_set_hash'][:16]}…)")
    for reason in decision["reasons"]:
        console.print(f"  - {escape('[' + reason['policy_id'] + ']')} {escape(reason['text'])}")
    for error in decision.get("errors", []):
        console.print(f"  - [red]error:[/] {escape(error)}")


@policy_app.command("check")
def policy_check(
    path: Annotated[Path, typer.Argument(help="Study contract (YAML or JSON).")],
) -> None:
    """Dry-run a study: the decision and every reason, without submitting. Exits 2 on deny."""
    contract = read_document(path)
    with api() as client:
        decision = client.request("POST", "/api/v1/policy/check", json=contract)
    show_decision(decision)
    if not decision["allowed"]:
        raise typer.Exit(2)


@policy_app.command("show")
def policy_show(
    files: Annotated[bool, typer.Option("--files", help="Print every policy file.")] = False,
) -> None:
    """The active policy set and the versions published so far."""
    with api() as client:
        active = client.request("GET", "/api/v1/policy")
        versions = client.request("GET", "/api/v1/policy/versions")
    if state.as_json:
        print_json({"active": active, "versions": versions})
        return
    table = Table(title="Policy versions")
    for column in ("version", "hash", "active", "by", "at", "note"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            str(v["version"]),
            v["policy_set_hash"][:16] + "…",
            "yes" if v["active"] else "",
            v["published_by"],
            v["published_at"][:19],
            v["note"],
        )
    console.print(table)
    if files:
        for name, text in sorted(active["files"].items()):
            console.rule(name)
            console.print(text, markup=False, highlight=False)


@policy_app.command("publish")
def policy_publish(
    directory: Annotated[
        Path, typer.Argument(help="Directory with consortium/*.cedar (and schema.cedarschema).")
    ],
    note: Annotated[str, typer.Option(help="Why (recorded).")] = "",
) -> None:
    """Publish a new version of the consortium policy set (consortium admin). It is
    validated first; an invalid policy is refused with the file, line and reason."""
    folder = directory / "consortium" if (directory / "consortium").is_dir() else directory
    files = {p.name: p.read_text() for p in sorted(folder.glob("*.cedar"))}
    if not files:
        fail(f"no .cedar files in {folder}")
    body: dict[str, Any] = {"files": files, "note": note}
    schema = directory / "schema.cedarschema"
    if schema.exists():
        body["schema"] = schema.read_text()
    with api() as client:
        change = client.request("POST", "/api/v1/policy", json=body)
    if state.as_json:
        print_json(change)
    else:
        version = change["version"]
        console.print(
            f"[green]published[/] version {version['version']} "
            f"({version['policy_set_hash'][:16]}…): {json.dumps(change['details'])}"
        )


@policy_app.command("activate")
def policy_activate(
    version: Annotated[int, typer.Argument(help="Version to make active.")],
) -> None:
    """Roll back (or forward) to a published version (consortium admin)."""
    with api() as client:
        change = client.request("POST", f"/api/v1/policy/versions/{version}/activate")
    console.print(f"[green]active[/] version {change['version']['version']}")


@budget_app.command("show")
def budget_show(dataset_id: Annotated[str, typer.Argument(help="Dataset id.")]) -> None:
    """A dataset's lifetime epsilon: cap, spent, reserved, remaining, and per study."""
    with api() as client:
        budget = client.request("GET", f"/api/v1/budgets/{dataset_id}")
    if state.as_json:
        print_json(budget)
        return
    console.print(
        f"[bold]{budget['dataset_id']}[/]  ε cap {budget['epsilon_cap']}  spent "
        f"{budget['epsilon_spent']}  reserved {budget['epsilon_reserved']}  "
        f"[bold]remaining {budget['epsilon_remaining']}[/]   "
        f"(δ remaining {budget['delta_remaining']})"
    )
    table = Table(title="Per study")
    for column in ("study", "reserved", "charged", "released", "outstanding", "rounds charged"):
        table.add_column(column)
    for line in budget["lines"]:
        table.add_row(
            line["study_id"],
            str(line["epsilon_reserved"]),
            str(line["epsilon_charged"]),
            str(line["epsilon_released"]),
            str(line["epsilon_outstanding"]),
            str(line["charges"]),
        )
    console.print(table)


@audit_app.command("head")
def audit_head() -> None:
    """The latest signed tree head (size, root, signature, cosigners)."""
    with api() as client:
        head = client.request("GET", "/api/v1/audit/heads/latest")
    print_json(head)


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Argument(help="File to write the export to (JSON).")],
) -> None:
    """Download the whole log with heads and cosignatures (compliance officer, admin),
    page by page, into one file."""
    from concord_protocol.audit.export import write_export

    with api() as client, _export_progress() as on_page:
        export = client.audit_export(on_page=on_page)
    write_export(export, out)
    console.print(f"[green]wrote[/] {out} ({len(export.entries)} entries)")


@contextmanager
def _export_progress() -> Iterator[Callable[[int, int], None]]:
    """A rich progress line for a paged export (entries received so far)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), console=err_console, transient=True
    ) as progress:
        task = progress.add_task("exporting the audit log", total=None)

        def on_page(received: int, _next: int) -> None:
            progress.update(task, description=f"exporting the audit log: {received} entries")

        yield on_page


@audit_app.command("verify")
def audit_verify(
    export_file: Annotated[
        Path | None,
        typer.Option("--file", help="Verify this export offline instead of the live log."),
    ] = None,
    server_key: Annotated[
        str | None,
        typer.Option(help="The server's head-signing key (base64), obtained out of band."),
    ] = None,
    site_keys: Annotated[
        Path | None,
        typer.Option(
            "--site-keys",
            help="JSON file of each site's signing key(s), obtained out of band "
            "(`site-node peers export-keys` writes one).",
        ),
    ] = None,
    quorum: Annotated[
        int | None,
        typer.Option(min=1, help="Valid cosignatures the latest head must carry (else exit 1)."),
    ] = None,
    tree_size: Annotated[
        int | None,
        typer.Option(min=0, help="The log must hold at least this many entries."),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option(help="Expected root (hex) of the first --tree-size entries (or all)."),
    ] = None,
    log_id: Annotated[
        str | None, typer.Option(help="The log's identity cosignatures must name.")
    ] = None,
    trust_export_keys: Annotated[
        bool,
        typer.Option(
            "--trust-export-keys",
            help="Check against the keys inside the export (integrity against whoever made "
            "it only) when --server-key or --site-keys is missing.",
        ),
    ] = False,
) -> None:
    """Check the log end to end: every leaf, the roots, the head signatures and the sites'
    cosignatures, with keys you obtained out of band. Exit 0 when everything verifies
    (and the latest head meets --quorum), 1 when anything does not, 2 on bad usage."""
    from pydantic import ValidationError

    from concord_protocol.audit.render import render_report
    from concord_protocol.audit.trusted_keys import SiteKeysError, load_site_keys
    from concord_protocol.audit.verify import verify_export
    from consortium_server.audit.cli_support import load_export_file
    from consortium_server.errors import DomainError

    missing = [
        flag
        for flag, value in (("--server-key", server_key), ("--site-keys", site_keys))
        if value is None
    ]
    if missing and not trust_export_keys:
        err_console.print(
            f"[red]error:[/] pass {' and '.join(missing)} (keys obtained out of band): the "
            "keys inside an export are whoever made it's; --trust-export-keys checks against "
            "them anyway"
        )
        raise typer.Exit(2)
    try:
        trusted_sites = load_site_keys(site_keys) if site_keys is not None else None
    except SiteKeysError as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    try:
        if export_file is not None:
            export = load_export_file(export_file)
        else:
            try:
                with api() as client, _export_progress() as on_page:
                    export = client.audit_export(on_page=on_page)
            except (ValidationError, ValueError) as exc:
                fail(f"the server's export is not a Concord audit export: {exc}")
    except DomainError as exc:
        fail(exc.public_message())
    if trusted_sites is None:  # --trust-export-keys: the export's own, said to be so
        trusted_sites = {s.site_id: [s.signing_public_key] for s in export.sites}
    report = verify_export(
        export,
        trusted_server_key=server_key or export.server_public_key,
        trusted_site_keys=trusted_sites,
        quorum=quorum,
        log_id=log_id,
        expected_size=tree_size,
        expected_root=root,
    )
    if state.as_json:
        print_json(
            {
                "ok": report.ok,
                "summary": report.summary(),
                "entries": report.entries,
                "witnessed_size": report.witnessed_size,
                "unwitnessed_entries": report.unwitnessed_entries,
                "keys_from_export": bool(missing),
                "problems": [{"kind": p.kind.value, "message": p.message} for p in report.problems],
            }
        )
    else:
        render_report(report, console)
    if missing:
        err_console.print(
            f"[yellow]warning:[/] no {' or '.join(missing)}: checked against the keys inside "
            "the export, which whoever rewrote the log could have replaced."
        )
    if quorum is None:
        err_console.print("[dim]note: no --quorum: unwitnessed entries do not fail the check.[/]")
    if not report.ok:
        raise typer.Exit(1)
