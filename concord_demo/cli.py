"""``consortium demo``: the command, registered with the ``consortium`` CLI as a plugin.

The server's CLI finds it through the ``concord.consortium_commands`` entry point, so the
server never imports the demo (which imports both roles). Nothing heavy is imported until
the command runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Annotated

import typer

from consortium_server.cli.common import console, fail

__all__ = ["demo"]

#: What the hospitals of the demo train with (the site extra).
SITE_PACKAGES = ("torch", "monai", "opacus")


def demo(
    rounds: Annotated[int, typer.Option(help="Federated rounds.", min=1, max=20)] = 3,
    epsilon: Annotated[float, typer.Option(help="Study epsilon (per site, whole study).")] = 6.0,
    state_dir: Annotated[
        Path, typer.Option(help="Where everything is written (wiped at start).")
    ] = Path(".concord/demo"),
    keep_running: Annotated[
        bool, typer.Option(help="Leave the processes up at the end (Ctrl-C to stop).")
    ] = False,
    imaging: Annotated[
        bool,
        typer.Option(
            help="The imaging study instead: 3D lesion segmentation (synthetic volumes, UNet)."
        ),
    ] = False,
) -> None:
    """Run a whole study across three local hospitals on real processes (embedded defaults).

    Starts the server (SQLite, built-in issuer), a SuperLink (TLS, SuperNode auth), and per
    hospital a SuperNode and a site agent; then enrolment, the policy dry run, approvals,
    key exchange, DP + HE rounds, witnessing, the release gate, and the compliance report.
    """
    missing = [name for name in SITE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        fail(
            f"the demo needs the site node's packages too ({', '.join(missing)} missing)",
            hint="install both roles: pip install '.[server,site]' (make demo does)",
        )
    from concord_demo.story import DemoOptions, run_demo

    options = DemoOptions(
        state_dir=state_dir,
        rounds=rounds,
        epsilon=epsilon,
        keep_running=keep_running,
        imaging=imaging,
    )
    try:
        result = run_demo(options, console, Path(sys.executable).parent)
    except Exception as exc:
        fail(f"the demo stopped: {exc}", hint=f"process logs are under {state_dir}")
    if not (result.audit_ok and result.released):
        raise typer.Exit(1)
