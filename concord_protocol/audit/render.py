"""Print a verification report for people (both CLIs: ``consortium audit verify`` and
``site-node audit verify``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from concord_protocol.audit.verify import VerificationReport

__all__ = ["render_report"]


def render_report(report: VerificationReport, console: Console) -> None:
    """Print a green OK line, or a table of every problem and a red summary."""
    if report.ok:
        console.print(f"[bold green]{report.summary()}[/]")
        if report.witness_quorum is not None and report.unwitnessed_entries:
            console.print(
                f"[yellow]{report.unwitnessed_entries} entries are after the last head with "
                f"{report.witness_quorum} cosignatures (not yet witnessed).[/]"
            )
        if report.legacy_cosignatures:
            console.print(
                f"[dim]{report.legacy_cosignatures} version 1 cosignatures verified; they "
                "bind no log or key and count towards no quorum.[/]"
            )
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
