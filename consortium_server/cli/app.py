"""The ``consortium`` Typer application."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from consortium_server.cli.common import api, console, fail, print_json, read_document, state
from consortium_server.cli.governance import audit_app, budget_app, policy_app
from consortium_server.cli.studies import catalogue_app, study_app
from consortium_server.settings import ServerSettings

app = typer.Typer(
    name="consortium",
    help=(
        "Concord consortium server and client.\n\n"
        "Operators run `consortium server`; researchers use `consortium catalogue` and "
        "`consortium study`; data stewards `consortium study approve/decline`. "
        "Client commands read CONCORD_API_URL and CONCORD_TOKEN (or --api-url / --token)."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema: apply migrations, show the revision.")
site_app = typer.Typer(help="Enrol, list and revoke hospital sites (consortium admin).")
app.add_typer(study_app, name="study")
app.add_typer(catalogue_app, name="catalogue")
app.add_typer(site_app, name="site")
app.add_typer(policy_app, name="policy")
app.add_typer(budget_app, name="budget")
app.add_typer(audit_app, name="audit")
app.add_typer(db_app, name="db")


@app.callback()
def _options(
    api_url: Annotated[
        str | None, typer.Option(help="Server URL (default CONCORD_API_URL or 127.0.0.1:8600).")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="Bearer token (default CONCORD_TOKEN).", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    state.api_url = api_url
    state.token = token
    state.as_json = as_json


def _server_settings() -> ServerSettings:
    try:
        return ServerSettings()
    except ValidationError as exc:
        # Each problem with where it is and what to do; never the input values (secrets).
        problems = [
            ".".join(map(str, e["loc"])) + ": " + e["msg"]
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")
            for e in exc.errors(include_url=False, include_input=False)
        ]
        fail(
            "invalid server settings:\n" + "\n".join(problems),
            hint="See docs/operator.md for CONCORD_* settings.",
        )


@app.command()
def server(
    host: Annotated[str | None, typer.Option(help="Listen address (CONCORD_API__HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CONCORD_API__PORT).")] = None,
) -> None:
    """Run the consortium API server (settings from CONCORD_* variables)."""
    import uvicorn

    from consortium_server.logs import configure_logging
    from consortium_server.main import create_app

    settings = _server_settings()
    if host is not None:
        settings.api.host = host
    if port is not None:
        settings.api.port = port
    configure_logging(settings.log_level, json_lines=settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.api.host,
        port=settings.api.port,
        log_config=None,
        access_log=False,
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration to the configured database."""
    from consortium_server.db.migrate import current_revision, upgrade_to_head
    from consortium_server.db.session import make_engine

    settings = _server_settings()
    engine = make_engine(settings.database_url())
    before = current_revision(engine)
    upgrade_to_head(engine)
    after = current_revision(engine)
    engine.dispose()
    console.print(f"database at revision [bold]{after}[/] (was {before or 'empty'})")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the newest this version ships."""
    from consortium_server.db.migrate import current_revision, head_revision
    from consortium_server.db.session import make_engine

    engine = make_engine(_server_settings().database_url())
    current = current_revision(engine)
    engine.dispose()
    head = head_revision()
    console.print(f"database: {current or 'empty'}; shipped: {head}")
    if current != head:
        raise typer.Exit(1)


@app.command()
def token(
    user: Annotated[str, typer.Option(help="Subject of the token, e.g. rita.")],
    role: Annotated[
        list[str],
        typer.Option(
            help="Realm role (repeatable): researcher, data_steward, site_node, "
            "compliance_officer, consortium_admin."
        ),
    ],
    org: Annotated[str | None, typer.Option(help="Organisation claim.")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint a development token with the local issuer (identity.mode=local only)."""
    from concord_protocol.principals import Role
    from consortium_server.identity.factory import build_local_issuer

    settings = _server_settings()
    if settings.identity.mode != "local" or settings.environment != "development":
        fail(
            "`consortium token` works only with the local issuer in development",
            hint="In production get tokens from Keycloak.",
        )
    unknown = sorted(set(role) - {r.value for r in Role})
    if unknown:
        fail(f"unknown role(s): {', '.join(unknown)}")
    issuer = build_local_issuer(settings)
    typer.echo(
        issuer.mint(
            subject=user,
            roles=role,
            organisation=org,
            audience=settings.identity.audience,
            ttl_s=ttl,
        )
    )


@app.command()
def whoami() -> None:
    """Show the subject, roles and organisation your token carries."""
    with api() as client:
        me = client.me()
    if state.as_json:
        print_json(me)
    else:
        console.print(
            f"{me['subject']}  roles: {', '.join(me['roles']) or '(none)'}  "
            f"organisation: {me['organisation'] or '(none)'}"
        )


@site_app.command("enrol")
def site_enrol(
    path: Annotated[
        Path,
        typer.Argument(help="Enrolment (YAML/JSON), e.g. from `site-node keys enrolment`."),
    ],
) -> None:
    """Enrol a hospital with its public keys."""
    with api() as client:
        site = client.enrol_site(read_document(path))
    if state.as_json:
        print_json(site)
    else:
        console.print(f"[green]enrolled[/] {site['id']} ({site['organisation']})")
        node = site.get("supernode_node_id")
        if node:
            console.print(f"SuperNode key registered with the SuperLink: node id {node}")
        else:
            console.print(
                "[yellow]SuperNode key not registered[/] (the server has no SuperLink): "
                "register it with `flwr supernode register`"
            )


@site_app.command("list")
def site_list() -> None:
    """List enrolled sites."""
    with api() as client:
        sites = client.list_sites()
    if state.as_json:
        print_json(sites)
        return
    table = Table(title=f"{len(sites)} sites")
    for column in ("id", "organisation", "status", "contact", "enrolled"):
        table.add_column(column)
    for s in sites:
        table.add_row(
            s["id"], s["organisation"], s["status"], s["contact_email"], s["enrolled_at"][:19]
        )
    console.print(table)


@site_app.command("revoke")
def site_revoke(
    site_id: Annotated[str, typer.Argument(help="Site id.")],
    reason: Annotated[str, typer.Option(help="Why (recorded).")],
) -> None:
    """Revoke a site: it can no longer publish, approve or train; every study of it that
    has not finished is aborted (and its Flower run stopped)."""
    with api() as client:
        site = client.request("POST", f"/api/v1/sites/{site_id}/revoke", json={"reason": reason})
    console.print(f"[yellow]revoked[/] {site['id']}")


#: Entry-point group of commands other packages add to ``consortium`` (``consortium demo``
#: comes from :mod:`concord_demo`, the one package that plays both roles: the server's CLI
#: finds it by name, without importing it).
PLUGIN_GROUP = "concord.consortium_commands"


def _add_plugin_commands() -> None:
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            command = entry.load()
        except ImportError as exc:  # a plugin whose package is not installed here
            app.command(
                name=entry.name,
                help=f"(not installed: {entry.module})",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            )(_missing_plugin(entry.name, entry.module, exc))
            continue
        app.command(name=entry.name)(command)


def _missing_plugin(name: str, module: str, error: ImportError) -> Callable[[], None]:
    def missing() -> None:
        fail(
            f"`consortium {name}` comes from {module}, which this installation lacks "
            f"({error.name or error} is missing)",
            hint="the demo plays both roles: install both, pip install '.[server,site]' "
            "from a checkout (make demo does)",
        )

    return missing


_add_plugin_commands()


def main() -> None:
    """Entry point of the ``consortium`` console script."""
    app()
