"""``site-node models`` and ``site-node data``: the model catalogue, and the hospital's
local datasets (read locally; only their non-identifying summary is ever published)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from site_node.settings import SiteSettings

models_app = typer.Typer(help="The model catalogue: the only models a study can train here.")
data_app = typer.Typer(help="This hospital's datasets: check them locally, publish metadata.")
console = Console()
err = Console(stderr=True)


def _fail(message: str, hint: str | None = None) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    raise typer.Exit(1)


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every catalogue model with its hyperparameters (name, default, range)."""
    from concord_protocol.catalogue import list_models

    entries = [entry.schema() for entry in list_models()]
    if as_json:
        console.print_json(data=entries)
        return
    table = Table(title="Model catalogue (DP-ready: GroupNorm, no in-place ops)")
    for column in ("name", "version", "modality", "task", "hyperparameters", "description"):
        table.add_column(column)
    for e in entries:
        params = ", ".join(
            f"{h['name']}={h['default']}"
            + (f" [{h.get('minimum')}..{h.get('maximum')}]" if "minimum" in h else "")
            for h in e["hyperparameters"]
        )
        table.add_row(e["name"], e["version"], e["modality"], e["task"], params, e["description"])
    console.print(table)


def _read_configs(path: Path) -> list[Any]:
    from site_node.data.registry import DatasetConfig

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read {path}: {exc}")
    items = raw.get("datasets") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        _fail(f"{path} must hold a list of datasets (or a mapping with a `datasets` list)")
    configs = []
    for number, item in enumerate(items, start=1):
        try:
            configs.append(DatasetConfig.model_validate(item))
        except ValidationError as exc:
            _fail(f"dataset #{number} in {path} is not valid:\n{exc}")
    return configs


def _datasets_file(path: Path | None) -> Path:
    chosen = path or SiteSettings().datasets_file
    if chosen is None:
        _fail(
            "no datasets file",
            hint="Pass --file or set CONCORD_SITE_DATASETS_FILE (see docs/hospital-it.md).",
        )
    return chosen


@data_app.command("check")
def data_check(
    path: Annotated[Path | None, typer.Option("--file", help="Datasets YAML.")] = None,
) -> None:
    """Load every registered dataset locally and show what would be published about it."""
    from site_node.data.registry import load_dataset
    from site_node.errors import SiteError

    configs = _read_configs(_datasets_file(path))
    table = Table(title=f"{len(configs)} local dataset(s): summaries only, no records")
    for column in ("id", "kind", "records (train/test)", "input", "classes", "label counts"):
        table.add_column(column)
    failed = 0
    for config in configs:
        try:
            train = load_dataset(config, split="train")
            test = load_dataset(config, split="test")
        except SiteError as exc:
            failed += 1
            table.add_row(config.id, config.kind, f"[red]{exc.code}[/]", str(exc), "", "")
            continue
        summary = train.summary()
        table.add_row(
            config.id,
            config.kind,
            f"{len(train)}/{len(test)}",
            "x".join(str(d) for d in summary["input_shape"]),
            str(summary["num_classes"]),
            ", ".join(f"{k}: {v}" for k, v in summary["label_counts"].items()),
        )
    console.print(table)
    if failed:
        raise typer.Exit(1)


@data_app.command("catalogue-entry")
def data_catalogue_entry(
    dataset_id: Annotated[str, typer.Argument(help="Local dataset id.")],
    governance: Annotated[
        Path,
        typer.Option(help="YAML with purposes, budgets and GDPR fields (docs/examples)."),
    ],
    path: Annotated[Path | None, typer.Option("--file", help="Datasets YAML.")] = None,
) -> None:
    """Print the catalogue entry for a local dataset: governance fields from your YAML plus
    the record count and summary computed here. Publish it with `consortium catalogue publish`."""
    from site_node.data.publish import catalogue_entry

    configs = {c.id: c for c in _read_configs(_datasets_file(path))}
    if dataset_id not in configs:
        _fail(f"no local dataset {dataset_id!r}", hint=f"known: {', '.join(sorted(configs))}")
    try:
        entry = yaml.safe_load(governance.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"cannot read {governance}: {exc}")
    if not isinstance(entry, dict):
        _fail(f"{governance} must hold a mapping")
    entry = catalogue_entry(configs[dataset_id], entry)
    typer.echo(yaml.safe_dump(entry, sort_keys=False))
    # On stderr, so the entry on stdout can be piped to `consortium catalogue publish`.
    from concord_protocol.disclosure import PRIVACY_UNIT, public

    typer.echo(
        "Publishing this entry declares public, without differential privacy: "
        + "; ".join(public())
        + f". Everything else this site sends is covered by each study's (epsilon, delta) "
        f"per {PRIVACY_UNIT} (see docs/privacy.md).",
        err=True,
    )
