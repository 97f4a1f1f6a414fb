"""The ``site-node`` command: a hospital's keys, local datasets and model catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from site_node.cli_data import data_app, models_app
from site_node.cli_trust import keys_fingerprint, keys_rotate, peers_app, study_app
from site_node.errors import SiteError
from site_node.key_files import SUPERNODE_KEY_FILE
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
app.add_typer(peers_app, name="peers")
app.add_typer(study_app, name="study")
keys_app.command("fingerprint")(keys_fingerprint)
keys_app.command("rotate")(keys_rotate)
audit_app = typer.Typer(help="Check the consortium's audit log as this site's witness.")
app.add_typer(audit_app, name="audit")
console = Console()
err = Console(stderr=True)


def _keys_dir(directory: Path | None) -> Path:
    return directory or SiteSettings().keys_dir()


def _print_settings_problems(exc: ValidationError) -> None:
    """Every settings problem: where, and what to do (never the values: they hold secrets)."""
    err.print(f"[red]error:[/] invalid CONCORD_SITE_* settings: {exc.error_count()} problem(s)")
    for problem in exc.errors(include_url=False, include_input=False):
        where = ".".join(map(str, problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        err.print(f"  {where}: {message}" if where else f"  {message}", markup=False)


@keys_app.command("init")
def keys_init(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Key directory (default <state_dir>/keys).")
    ] = None,
) -> None:
    """Create the site's Ed25519 signing key, X25519 exchange key and SuperNode EC key."""
    from site_node.crypto.errors import CryptoError
    from site_node.key_files import init_site_keys

    path = _keys_dir(directory)
    try:
        init_site_keys(path)
    except CryptoError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
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


@app.command("run")
def run(
    once: Annotated[
        bool, typer.Option("--once", help="Run one pass and exit (status 1 if a step failed).")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Run the site agent: sync approved studies, exchange study keys, cosign the audit log.

    Runs a pass every CONCORD_SITE_POLL_INTERVAL_S seconds until SIGTERM; logs JSON lines
    on stderr. Settings come from CONCORD_SITE_* variables (see docs/hospital-it.md).
    """
    from pydantic import ValidationError

    from site_node.agent.loop import configure_agent_logging, run_agent
    from site_node.crypto.errors import CryptoError

    configure_agent_logging(log_level)
    try:
        settings = SiteSettings()
        status = run_agent(settings, once=once)
    except ValidationError as exc:
        _print_settings_problems(exc)
        raise typer.Exit(2) from None
    except (SiteError, CryptoError) as exc:
        message = exc.diagnostics() if isinstance(exc, SiteError) else str(exc)
        err.print(f"[red]error:[/] {message}")
        raise typer.Exit(2) from None
    raise typer.Exit(status)


@app.command("agent-health")
def agent_health(
    max_age_s: Annotated[
        float,
        typer.Option(help="Fail when the agent's last pass finished longer ago than this."),
    ] = 900.0,
) -> None:
    """Exit 0 if the site agent finished a pass within --max-age-s (its heartbeat in the
    state dir), 1 otherwise: the agent container's probes (docs/hospital-it.md)."""
    from site_node.agent.heartbeat import age_s

    age = age_s(SiteSettings().state_dir)
    if age is None:
        err.print("[red]unhealthy:[/] the agent has not finished a pass yet")
        raise typer.Exit(1)
    if age > max_age_s:
        err.print(f"[red]unhealthy:[/] the agent's last pass finished {age:.0f} s ago")
        raise typer.Exit(1)
    console.print(f"ok: last pass {age:.0f} s ago")


@app.command(
    "supernode",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def supernode(
    ctx: typer.Context,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="The site's state dir (default CONCORD_SITE_STATE_DIR)."),
    ] = None,
    socket: Annotated[
        Path | None,
        typer.Option(
            help="Socket of the warm runner (default <state_dir>/supernode/runner/"
            "clientapp.sock; use a local filesystem, e.g. a tmpfs)."
        ),
    ] = None,
    warm: Annotated[
        bool, typer.Option("--warm/--no-warm", help="Start the warm ClientApp runner.")
    ] = True,
) -> None:
    """Run flower-supernode with the site's guarded ClientApp runner (for containers).

    Every argument after the options goes to flower-supernode, e.g.
    ``site-node supernode -- --superlink HOST:9092 --root-certificates ca.crt ...``.
    Writes the site's flwr-clientapp (app-bundle check; see docs/architecture.md) and deny
    stubs for every other Flower app into <state_dir>/supernode/bin, puts them first on
    PATH, runs the SuperNode with --isolation process and a SuperExec secret file (created
    mode 0600 in <state_dir>/supernode unless --superexec-auth-secret-file is given; refuses
    --isolation subprocess and a non-loopback --host), starts the site's executor (ClientApp
    tasks only, tokens by file) and the warm runner that keeps torch/MONAI/Opacus/TenSEAL/
    Flower imported, then becomes flower-supernode (same pid).
    """
    from concord_protocol.errors import ConcordError
    from site_node.federation.processes import exec_supernode

    try:
        settings = SiteSettings()
        settings.check_supernode_args(list(ctx.args))  # production: TLS on, CA present
    except ValidationError as exc:
        _print_settings_problems(exc)
        raise typer.Exit(2) from None
    except SiteError as exc:
        err.print(f"[red]error:[/] {escape(f'{exc.code}: {exc.diagnostics()}')}")
        raise typer.Exit(2) from None
    try:
        exec_supernode(
            state_dir or settings.state_dir,
            list(ctx.args),
            socket_path=socket,
            warm_runner=warm,
        )
    except ConcordError as exc:  # supernode.unsafe_args, superexec.* (the secret file)
        err.print(f"[red]error:[/] {escape(f'{exc.code}: {exc.diagnostics()}')}")
        raise typer.Exit(2) from None


@app.command("clientapp-runner")
def clientapp_runner(
    state_dir: Annotated[
        Path | None,
        typer.Option(help="The site's state dir (default CONCORD_SITE_STATE_DIR)."),
    ] = None,
    socket: Annotated[
        Path | None,
        typer.Option(help="Socket path (default <state_dir>/supernode/runner/clientapp.sock)."),
    ] = None,
) -> None:
    """Run the site's warm ClientApp runner in the foreground (until SIGTERM).

    ``site-node supernode`` starts it by itself; use this to run it on its own, next to a
    flower-supernode whose PATH starts with the site's flwr-clientapp. It exits when its
    parent process does.
    """
    from site_node.federation.warm.__main__ import main as warm_main

    state = state_dir or SiteSettings().state_dir
    warm_main(["--state-dir", str(state), *(["--socket", str(socket)] if socket else [])])


@audit_app.command("verify")
def audit_verify(
    export_file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Verify this audit export (from the compliance officer) with this site's "
            "pinned keys, instead of checking the server's latest head.",
        ),
    ] = None,
    quorum: Annotated[
        int | None,
        typer.Option(min=1, help="With --file: valid cosignatures the latest head must carry."),
    ] = None,
) -> None:
    """Check the audit log with this site's own trust.

    Without --file: the latest signed tree head extends the last head this site cosigned
    (read-only: nothing is cosigned or stored). With --file: the whole export, with the
    server key, log identity and peer keys this site pinned (never the export's), and it
    must contain the head this site last cosigned. Exit 1 if anything does not verify, 2
    if the site is not configured.
    """
    from pydantic import ValidationError

    from concord_protocol.errors import ConcordError
    from site_node.crypto.errors import CryptoError

    try:
        settings = SiteSettings()
        if export_file is not None:
            _verify_export_file(settings, export_file, quorum)
            return
        from site_node.agent.loop import verify_audit

        size, last = verify_audit(settings)
    except ValidationError as exc:
        err.print(f"[red]error:[/] invalid CONCORD_SITE_* settings: {exc.error_count()} problem(s)")
        raise typer.Exit(2) from None
    except CryptoError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except SiteError as exc:
        err.print(f"[red]error:[/] {exc.diagnostics()}")
        raise typer.Exit(
            2
            if exc.code in {"agent.no_site_id", "agent.no_credentials", "agent.no_server_key"}
            else 1
        ) from None
    except ConcordError as exc:  # the server refused, or its head does not verify
        err.print(f"[red]refused:[/] {exc.code}: {exc.message}")
        raise typer.Exit(1) from None
    if last is None:
        console.print(f"[yellow]ok[/] head of {size} entries is signed; nothing cosigned yet")
    else:
        console.print(f"[green]ok[/] head of {size} entries extends the cosigned head of {last}")


def _verify_export_file(settings: SiteSettings, path: Path, quorum: int | None) -> None:
    """``site-node audit verify --file``: print the report; exit 1 on any problem."""
    from pydantic import ValidationError

    from concord_protocol.audit.export import load_export
    from concord_protocol.audit.render import render_report
    from site_node.audit_verify import verify_export_as_site
    from site_node.crypto.sealing import SiteKeyPair

    if not settings.site_id:
        err.print("[red]error:[/] the site id is not set (CONCORD_SITE_SITE_ID)")
        raise typer.Exit(2)
    try:
        export = load_export(path)
    except FileNotFoundError:
        err.print(f"[red]error:[/] no such file: {path}")
        raise typer.Exit(2) from None
    except (ValidationError, UnicodeDecodeError, OSError, OverflowError) as exc:
        err.print(f"[red]error:[/] {path} is not a Concord audit export: {exc}")
        raise typer.Exit(1) from None
    report = verify_export_as_site(
        export,
        state_dir=settings.state_dir,
        site_id=settings.site_id,
        keys=SiteKeyPair.load(settings.keys_dir()),
        keys_dir=settings.keys_dir(),
        server_head_key=settings.server_head_key,
        audit_log_id=settings.audit_log_id,
        quorum=quorum,
    )
    render_report(report, console)
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``site-node`` console script."""
    app()
