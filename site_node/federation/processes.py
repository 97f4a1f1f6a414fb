"""Start this site's Flower SuperNode, with a ClientApp runner that refuses foreign bundles.

How Flower 1.41 runs a ClientApp: the SuperNode pulls a message, fetches the run's app
bundle (FAB) from the SuperLink, and (``--isolation subprocess``) its ``flower-superexec``
child starts one ``flwr-clientapp`` process per message. That process *installs the FAB
and imports the ClientApp the bundle's pyproject names*: whoever can start a run could ship
code to the hospital. Flower's own check (``--trusted-entities``) needs bundles signed by
the Flower platform (``valid_license``), which a self-hosted SuperLink does not provide.

So the site puts its own ``flwr-clientapp`` first on the SuperNode's ``PATH``
(:func:`write_runner_shim`). It runs Flower's ``run_clientapp`` with two changes
(:func:`guarded_clientapp_main`): the FAB is *checked, never installed*, and the ClientApp
is imported from the site's installed packages, never from the bundle. The rule
(:func:`check_bundle`), which is the site's code-execution boundary:

* the FAB's SHA-256 must be the hash of the site's own bundle (``concord_protocol/app``),
  or one the site's operator allowed in its
  :class:`~site_node.federation.approvals.ApprovalStore` (``allow_fab``);
* it may hold nothing but ``pyproject.toml``;
* the ClientApp it names must be the one allowed *for that hash*: Concord's own
  (:data:`~concord_protocol.bundle.CLIENTAPP_REF`) for the site's bundle and for a hash
  allowed without one (also every entry of earlier versions), else exactly the reference
  the operator gave with the hash (``allow_fab(hash, clientapp="module:attr")``).

Only after the bundle passed is that one ClientApp imported (``module:attr``, by
:func:`load_clientapp`). Anything else is refused before anything is installed or
imported, with an error reply. So whoever starts runs (a compromised consortium server)
cannot make a site run code: the most it can do is pick, by sending its exact bundle, a
ClientApp that this site's operator already allowed for that bundle.

The shim does not import the runner's heavy modules itself: it hands the message to the
site's *warm runner* (:mod:`site_node.federation.warm`), a process that imported torch,
MONAI, Opacus, TenSEAL and Flower once and forks a worker per message that runs
:func:`guarded_clientapp_main`. Flower still sees one ``flwr-clientapp`` process per
message (exit status and signals pass through the shim); if the runner is not reachable
the shim runs :func:`guarded_clientapp_main` in-process. :func:`start_supernode` starts the
runner next to the SuperNode and returns a :class:`SuperNodeProcess` that stops both;
:func:`exec_supernode` (``site-node supernode``, for containers) writes the shim, starts the
runner and becomes ``flower-supernode``.

Nothing else a SuperNode could start runs (deny by default). The SuperNode runs with
``--isolation process --superexec-auth-secret-file F``: Flower then starts no SuperExec of
its own, and the local Runtime API's ``acquire-task`` requires an HMAC made with the secret
in ``F`` (a file of mode 0600, never an argument or environment value). The site's executor
(:mod:`site_node.federation.executor`) holds that secret, acquires only ``flwr-clientapp``
tasks and starts the shim with the task token in a file (``--token-file``), never in argv.
An AgentApp run (or a ServerApp, simulation, model or connector task a running app creates)
is never acquired: nothing is installed, imported or started for it. As a second line, the
shim's directory, first on ``PATH``, holds a deny stub for every other Flower app command
and for ``flower-superexec`` (:func:`concord_protocol.superexec.write_deny_stubs`).
:func:`supernode_args_plan` enforces this for ``site-node supernode``: it adds ``--isolation
process`` and a secret file, and refuses ``--isolation subprocess`` and a runtime API host
other than loopback.

Runtime dependency installation stays off (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``;
the SuperNode's default is off too).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import tomli

from concord_protocol.bundle import CLIENTAPP_REF, bundle_hash
from concord_protocol.processes import (
    FlowerProcessError,
    ManagedProcess,
    flower_env,
    spawn,
    wait_for_port,
)
from concord_protocol.superexec import (
    IsolationRefusedError,
    ensure_secret_file,
    isolated_args,
    write_deny_stubs,
)
from site_node.errors import MessageRefusedError, SiteError
from site_node.federation.approvals import ApprovalStore, is_clientapp_ref
from site_node.federation.executor import executor_args
from site_node.federation.warm.protocol import runner_socket_path

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

log = logging.getLogger("concord.site.federation")

__all__ = [
    "AcceptedBundle",
    "BundleRefusedError",
    "SuperNodeArgsError",
    "SuperNodeProcess",
    "SuperNodeSpec",
    "check_bundle",
    "exec_supernode",
    "guarded_clientapp_main",
    "load_clientapp",
    "start_supernode",
    "start_warm_runner",
    "superexec_secret_path",
    "supernode_args_plan",
    "supernode_command",
    "write_runner_shim",
]

_ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


class BundleRefusedError(MessageRefusedError):
    """The run's app bundle, or the ClientApp it names, is not one this site allows.

    Flower turns it into the message's error reply, so the code (``bundle.*``) leads it.
    """

    code = "bundle.not_allowed"


@dataclass(frozen=True)
class AcceptedBundle:
    """A bundle that passed :func:`check_bundle`: its hash and the ClientApp to load."""

    digest: str
    clientapp: str


def check_bundle(fab_content: bytes, store: ApprovalStore) -> AcceptedBundle:
    """Accept or refuse a FAB (see the module for the rule); nothing is imported here.

    Raises :class:`BundleRefusedError`. The result's ``clientapp`` is the reference the
    bundle names, which is the one the site allows for its hash.
    """
    digest = hashlib.sha256(fab_content).hexdigest()
    allowed = store.allowed_fabs()
    allowed[bundle_hash()] = CLIENTAPP_REF  # the site's own bundle: Concord's ClientApp only
    expected = allowed.get(digest)
    if expected is None:
        raise BundleRefusedError(
            f"app bundle {digest[:16]} is not allowed at this site", code="bundle.not_allowed"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
            names = set(archive.namelist())
            if not names <= _ALLOWED_FILES:
                raise BundleRefusedError(
                    "app bundle holds files other than its configuration", code="bundle.extra_files"
                )
            config = tomli.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomli.TOMLDecodeError):
        raise BundleRefusedError(
            "app bundle is not a readable FAB", code="bundle.unreadable"
        ) from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components.get("clientapp") != expected:
        raise BundleRefusedError(
            f"app bundle {digest[:16]} names another ClientApp than the site allowed for it",
            code="bundle.wrong_clientapp",
        )
    return AcceptedBundle(digest, expected)


def load_clientapp(ref: str) -> ClientApp:
    """Import the ClientApp ``module:attr`` from the installed packages.

    Call it only with the reference of an :class:`AcceptedBundle`. Raises
    :class:`BundleRefusedError` if ``ref`` is not a plain reference or does not name a
    Flower ``ClientApp``.
    """
    import flwr.clientapp

    if not is_clientapp_ref(ref):
        raise BundleRefusedError("not a ClientApp reference", code="bundle.not_clientapp")
    module_name, _, attribute = ref.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not isinstance(target, flwr.clientapp.ClientApp):
        raise BundleRefusedError(f"{ref} is not a ClientApp", code="bundle.not_clientapp")
    return target


def guarded_clientapp_main(state_dir: Path, argv: list[str] | None = None) -> None:
    """``flwr-clientapp`` replacement: Flower's runner with the bundle check (see module).

    Uses Flower 1.41's ``flwr.supernode.runtime.run_clientapp`` module: its FAB installer
    is replaced by :func:`check_bundle` and its app loader by one returning the ClientApp of
    the bundle that passed the check (:func:`load_clientapp`); without a checked bundle
    nothing is loaded. ``tests/unit/site_node/federation`` pins these two names.
    """
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runner

    store = ApprovalStore(state_dir)
    accepted: list[AcceptedBundle] = []

    def install_checked(
        fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        accepted.append(check_bundle(content, store))
        return state_dir  # nothing is installed; the value is unused by the runner

    def load_fn(*args: Any, **kwargs: Any) -> Any:
        def load(*_: Any) -> Any:
            if len(accepted) != 1:
                raise BundleRefusedError(
                    "no checked app bundle to load a ClientApp for", code="bundle.unchecked"
                )
            return load_clientapp(accepted[0].clientapp)

        return load

    runner.install_from_fab = install_checked
    runner.get_load_client_app_fn = load_fn
    args = _parse_args_run_flwr_clientapp().parse_args(argv)
    token = try_obtain_flwr_app_token(args)
    if args.token_file:  # the executor's private copy: read once, then gone
        Path(args.token_file).unlink(missing_ok=True)
    runner.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def write_runner_shim(bin_dir: Path, state_dir: Path, socket_path: Path | None = None) -> Path:
    """Write ``bin_dir/flwr-clientapp``: the site's runner (see module), and next to it a
    deny stub for every other Flower app command and ``flower-superexec``.

    It runs :func:`guarded_clientapp_main` in the warm runner listening on ``socket_path``
    (default :func:`~site_node.federation.warm.protocol.runner_socket_path`), or in-process
    if that runner is not reachable. It imports nothing heavy itself: only
    :mod:`site_node.federation.warm.shim`.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    write_deny_stubs(bin_dir, allowed=frozenset({"flwr-clientapp"}))
    shim = bin_dir / "flwr-clientapp"
    sock = socket_path or runner_socket_path(state_dir)
    shim.write_text(
        f"#!{sys.executable}\n"
        '"""Concord: the site\'s guarded ClientApp runner (generated).\n\n'
        "Runs site_node.federation.processes.guarded_clientapp_main in the site's warm runner\n"
        '(site_node.federation.warm), or in-process if the runner is not reachable."""\n'
        "import sys\n"
        "from pathlib import Path\n"
        "from site_node.federation.warm.shim import shim_main\n"
        f"sys.exit(shim_main(Path({str(state_dir)!r}), Path({str(sock)!r})))\n"
    )
    shim.chmod(0o755)
    return shim


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to start one site's SuperNode."""

    site_id: str
    state_dir: Path
    datasets_file: Path
    superlink_address: str
    root_certificates: Path
    auth_private_key: Path
    runtime_port: int
    max_wait_time: float = 60.0
    #: Start the warm ClientApp runner (:mod:`site_node.federation.warm`) next to the node.
    warm_runner: bool = True
    #: The SuperExec secret file shared by the SuperNode and the site's executor (created
    #: with mode 0600 if missing); default :func:`superexec_secret_path`.
    superexec_secret_file: Path | None = None


def superexec_secret_path(state_dir: Path) -> Path:
    """Default SuperExec secret file of a site: ``<state_dir>/supernode/superexec.secret``."""
    return state_dir / "supernode" / "superexec.secret"


def _node_config(spec: SuperNodeSpec) -> str:
    def q(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return " ".join(
        [
            f"site-id={q(spec.site_id)}",
            f"state-dir={q(str(spec.state_dir))}",
            f"datasets-file={q(str(spec.datasets_file))}",
        ]
    )


@dataclass
class SuperNodeProcess(ManagedProcess):
    """A SuperNode, the site's executor and its warm ClientApp runner: :meth:`stop` stops
    all three.

    ``proc``, ``log_path`` and :meth:`alive` are the SuperNode's; ``runner`` is None when
    the node runs without a warm runner, ``executor`` when it was started without one.
    """

    runner: ManagedProcess | None = None
    executor: ManagedProcess | None = None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the executor (and its ClientApps), the SuperNode, then the runner; the
        node's exit code."""
        if self.executor is not None:
            self.executor.stop(timeout)
        code = super().stop(timeout)
        if self.runner is not None:
            self.runner.stop(timeout)
        return code


def _runner_args(state_dir: Path, socket_path: Path | None) -> list[str]:
    args = [sys.executable, "-m", "site_node.federation.warm", "--state-dir", str(state_dir)]
    if socket_path is not None:
        args += ["--socket", str(socket_path)]
    return args


def start_warm_runner(
    state_dir: Path,
    *,
    env: dict[str, str],
    log_path: Path,
    socket_path: Path | None = None,
    wait: float = 30.0,
) -> ManagedProcess:
    """Start the site's warm ClientApp runner; wait (up to ``wait`` s) for its socket.

    The runner binds its socket before it imports; a shim that connects meanwhile waits.
    It exits when this process does. Not listening in time is logged, not raised: the
    shim then runs the ClientApp in-process.
    """
    sock = socket_path or runner_socket_path(state_dir)
    proc = spawn(
        f"warm-runner-{state_dir.name}",
        _runner_args(state_dir, socket_path),
        env=env,
        log_path=log_path,
    )
    deadline = time.monotonic() + wait
    while not sock.exists() and proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not sock.exists():
        log.warning("warm runner not listening on %s: %s", sock, proc.log_tail(500))
    return proc


def supernode_command() -> list[str]:
    """How the site starts Flower's SuperNode: ``flower-supernode`` through
    :mod:`site_node.federation.supernode_main`, which polls the SuperLink every 0.2 s
    instead of every 3 s (the arguments are Flower's)."""
    return [sys.executable, "-m", "site_node.federation.supernode_main"]


def start_supernode(spec: SuperNodeSpec, *, wait: bool = True) -> SuperNodeProcess:
    """Start ``flower-supernode`` for the site (TLS, authenticated, ``--isolation process``
    with a SuperExec secret), the site's executor (ClientApp tasks only, tokens by file) and,
    unless ``spec.warm_runner`` is false, the warm ClientApp runner."""
    run_dir = spec.state_dir / "supernode"
    bin_dir = run_dir / "bin"
    write_runner_shim(bin_dir, spec.state_dir)
    secret = ensure_secret_file(spec.superexec_secret_file or superexec_secret_path(spec.state_dir))
    args = [
        *supernode_command(),
        "--superlink",
        spec.superlink_address,
        "--root-certificates",
        str(spec.root_certificates),
        "--auth-supernode-private-key",
        str(spec.auth_private_key),
        "--node-config",
        _node_config(spec),
        "--host",
        "127.0.0.1",
        "--port",
        str(spec.runtime_port),
        "--max-wait-time",
        str(spec.max_wait_time),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
    ]
    env = flower_env(run_dir / "flwr-home", path_prefix=bin_dir)
    runner = None
    if spec.warm_runner:
        runner = start_warm_runner(
            spec.state_dir, env=env, log_path=run_dir / "runner.log", wait=30.0 if wait else 0.0
        )
    node: ManagedProcess | None = None
    try:
        node = spawn(f"supernode-{spec.site_id}", args, env=env, log_path=run_dir / "supernode.log")
        executor = spawn(
            f"executor-{spec.site_id}",
            executor_args(
                spec.state_dir,
                runtime_api_address=f"127.0.0.1:{spec.runtime_port}",
                secret_file=secret,
                parent_pid=node.proc.pid,
            ),
            env=env,
            log_path=run_dir / "executor.log",
        )
    except BaseException:
        for started in (node, runner):
            if started is not None:
                started.stop()
        raise
    proc = SuperNodeProcess(
        node.name, node.proc, node.log_path, node._log, runner=runner, executor=executor
    )
    if wait:
        try:
            wait_for_port("127.0.0.1", spec.runtime_port, timeout=60.0, proc=proc.proc)
        except FlowerProcessError as exc:
            proc.stop()
            raise FlowerProcessError(str(exc), proc.log_tail()) from None
    return proc


class SuperNodeArgsError(SiteError):
    """``site-node supernode`` refuses ``flower-supernode`` arguments that would let the
    SuperNode start apps itself or open its runtime API beyond loopback."""

    code = "supernode.unsafe_args"


_INFO_FLAGS = frozenset({"-h", "--help", "-V", "--version"})


@dataclass(frozen=True)
class SuperNodeArgsPlan:
    """What ``site-node supernode`` runs: the SuperNode's arguments and its executor's."""

    supernode_args: list[str]
    #: ``argv`` of the site's executor; None for ``--help``/``--version`` (nothing runs).
    executor_argv: list[str] | None


def supernode_args_plan(
    state_dir: Path, supernode_args: list[str], *, parent_pid: int | None = None
) -> SuperNodeArgsPlan:
    """Check and complete ``flower-supernode`` arguments for the site (see the module).

    Flower's own parser reads them, so every spelling Flower accepts is seen. Adds
    ``--isolation process`` when absent and ``--superexec-auth-secret-file`` (the state
    dir's, created with mode 0600) when absent. Raises :class:`SuperNodeArgsError` for
    ``--isolation subprocess`` and for a runtime API ``--host`` other than loopback.
    """
    if _INFO_FLAGS & set(supernode_args):
        return SuperNodeArgsPlan(list(supernode_args), None)
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    try:
        checked = isolated_args(
            _parse_args_run_supernode(),
            supernode_args,
            default_secret=superexec_secret_path(state_dir),
        )
    except IsolationRefusedError as exc:
        if exc.option == "isolation":
            raise SuperNodeArgsError(
                f"--isolation {exc.value} lets the SuperNode start any app itself "
                "(the stock SuperExec runs AgentApps and passes tokens in argv)",
                hint="Remove --isolation (site-node supernode runs --isolation process with "
                "the site's executor).",
            ) from None
        raise SuperNodeArgsError(
            f"--host {exc.value} would expose the SuperNode's runtime API beyond this machine",
            hint="Leave --host out (127.0.0.1).",
        ) from None
    args, parsed, secret = checked.args, checked.parsed, checked.secret_file
    host = str(parsed.host)
    runtime_host = f"[{host}]" if ":" in host else host
    root = Path(parsed.ssl_ca_certfile) if parsed.ssl_certfile else None
    return SuperNodeArgsPlan(
        args,
        executor_args(
            state_dir,
            runtime_api_address=f"{runtime_host}:{parsed.port}",
            secret_file=secret,
            root_certificates=root,
            parent_pid=parent_pid,
        ),
    )


def supernode_exec_plan(
    state_dir: Path,
    supernode_args: list[str],
    *,
    environ: dict[str, str],
    socket_path: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """``argv`` and environment of ``flower-supernode`` with the site's shim (and deny
    stubs) first on ``PATH`` (written to ``<state_dir>/supernode/bin``); the arguments as
    :func:`supernode_args_plan` completes them."""
    bin_dir = state_dir / "supernode" / "bin"
    write_runner_shim(bin_dir, state_dir, socket_path)
    plan = supernode_args_plan(state_dir, supernode_args)
    env = dict(environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), environ.get("PATH", os.defpath)])
    return [*supernode_command(), *plan.supernode_args], env


def exec_supernode(
    state_dir: Path,
    supernode_args: list[str],
    *,
    socket_path: Path | None = None,
    warm_runner: bool = True,
) -> NoReturn:
    """Become ``flower-supernode supernode_args`` with the site's runner (containers).

    Writes the shim and the deny stubs, checks and completes the arguments
    (:func:`supernode_args_plan`; raises :class:`SuperNodeArgsError`), starts the site's
    executor and the warm runner (unless ``warm_runner`` is false; their output goes to this
    process's stdout/stderr) and ``exec``s the SuperNode, which keeps this pid: executor and
    runner, our children, exit when the SuperNode does.
    """
    import subprocess

    argv, env = supernode_exec_plan(
        state_dir, supernode_args, environ=dict(os.environ), socket_path=socket_path
    )
    plan = supernode_args_plan(state_dir, supernode_args, parent_pid=os.getpid())
    if plan.executor_argv is not None:
        subprocess.Popen(plan.executor_argv, env=env)
        if warm_runner:
            subprocess.Popen(_runner_args(state_dir, socket_path), env=env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # noqa: S606 (fixed binary, argument list)
