"""CLI logic for ``consortium audit verify`` and ``site-node audit verify`` (no Typer here).

The CLI modules call :func:`verify_export_file` (or
:func:`consortium_server.audit.verify.verify_export` on an export fetched from the API)
and print the result with :func:`render_report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from concord_protocol.audit.export import load_export
from concord_protocol.audit.verify import VerificationReport, verify_export
from consortium_server.errors import InvalidRequestError

__all__ = ["render_report", "verify_export_file"]


def verify_export_file(
    path: Path,
    *,
    trusted_server_key: str | None = None,
    trusted_site_keys: Mapping[str, str] | None = None,
    quorum: int | None = None,
) -> VerificationReport:
    """Load and verify an export file; ``audit.export_invalid`` if it cannot be read.

    Pass the server's public key (base64 raw Ed25519) obtained out of band as
    ``trusted_server_key``: without it the export is checked against its own key.
    """
    try:
        export = load_export(Path(path))
    except FileNotFoundError as exc:
        raise InvalidRequestError(f"No such file: {path}", code="audit.export_invalid") from exc
    except (ValidationError, UnicodeDecodeError, OSError) as exc:
        raise InvalidRequestError(
            f"{path} is not a Concord audit export: {exc}", code="audit.export_invalid"
        ) from exc
    return verify_export(
        export,
        trusted_server_key=trusted_server_key,
        trusted_site_keys=trusted_site_keys,
        quorum=quorum,
    )


def render_report(report: VerificationReport, console: Console) -> None:
    """Print a green OK line, or a table of every problem and a red summary."""
    if report.ok:
        console.print(f"[bold green]{report.summary()}[/]")
        if report.unsigned_entries:
            console.print(
                f"[yellow]{report.unsigned_entries} entries are newer than the latest "
                "signed head (not yet covered by a signature).[/]"
            )
        return
    table = Table(title="Audit log verification problems", show_lines=False)
    table.add_column("kind", style="bold red")
    table.add_column("index", justify="right")
    table.add_column("tree size", justify="right")
    table.add_column("site")
    table.add_column("detail")
    for problem in report.problems:
        table.add_row(
            problem.kind.value,
            "" if problem.index is None else str(problem.index),
            "" if problem.tree_size is None else str(problem.tree_size),
            problem.site_id or "",
            problem.message,
        )
    console.print(table)
    console.print(f"[bold red]{report.summary()}[/]")
