"""Start this site's Flower SuperNode, with a ClientApp runner that refuses foreign bundles.

How Flower 1.41 runs a ClientApp: the SuperNode pulls a message, fetches the run's app
bundle (FAB) from the SuperLink, and (``--isolation subprocess``) its ``flower-superexec``
child starts one ``flwr-clientapp`` process per message. That process *installs the FAB
and imports the ClientApp the bundle's pyproject names*: whoever can start a run could ship
code to the hospital. Flower's own check (``--trusted-entities``) needs bundles signed by
the Flower platform (``valid_license``), which a self-hosted SuperLink does not provide.

So the site puts its own ``flwr-clientapp`` first on the SuperNode's ``PATH``
(:func:`write_runner_shim`). It runs Flower's ``run_clientapp`` with two changes
(:func:`guarded_clientapp_main`): the FAB is *checked, never installed* (its SHA-256 must be
the hash of the site's own bundle, ``site_node/federation/app``, or one the site allowed in
its :class:`~site_node.federation.approvals.ApprovalStore`; and it may hold nothing but
``pyproject.toml``), and the ClientApp is always :data:`site_node.federation.clientapp.app`
from the installed package. A refused bundle gets an error reply (and runs no code).

Runtime dependency installation stays off (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``;
the SuperNode's default is off too).
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli

from consortium_server.federation.processes import (
    FlowerProcessError,
    ManagedProcess,
    flower_env,
    flwr_binary,
    spawn,
    wait_for_port,
)
from site_node.federation import APP_DIR
from site_node.federation.approvals import ApprovalStore

__all__ = [
    "CLIENTAPP_REF",
    "BundleRefusedError",
    "SuperNodeSpec",
    "bundle_hash",
    "check_bundle",
    "guarded_clientapp_main",
    "start_supernode",
    "write_runner_shim",
]

CLIENTAPP_REF = "site_node.federation.clientapp:app"
_ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


class BundleRefusedError(Exception):
    """The run's app bundle is not one this site allows."""


def bundle_hash(app_dir: Path = APP_DIR) -> str:
    """SHA-256 of the FAB that ``flwr run`` builds from ``app_dir`` (builds are deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()


def check_bundle(fab_content: bytes, store: ApprovalStore) -> str:
    """Accept or refuse a FAB; return its hash. Raises :class:`BundleRefusedError`."""
    digest = hashlib.sha256(fab_content).hexdigest()
    allowed = {bundle_hash()} | store.allowed_fab_hashes()
    if digest not in allowed:
        raise BundleRefusedError(f"app bundle {digest[:16]} is not allowed at this site")
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
            names = set(archive.namelist())
            if not names <= _ALLOWED_FILES:
                raise BundleRefusedError("app bundle holds files other than its configuration")
            config = tomli.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomli.TOMLDecodeError):
        raise BundleRefusedError("app bundle is not a readable FAB") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components.get("clientapp") != CLIENTAPP_REF:
        raise BundleRefusedError("app bundle names another ClientApp")
    return digest


def guarded_clientapp_main(state_dir: Path, argv: list[str] | None = None) -> None:
    """``flwr-clientapp`` replacement: Flower's runner with the bundle check (see module).

    Uses Flower 1.41's ``flwr.supernode.runtime.run_clientapp`` module: its FAB installer
    is replaced by :func:`check_bundle` and its app loader by one returning the installed
    ClientApp. ``tests/unit/site_node/federation`` pins these two names.
    """
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runner

    store = ApprovalStore(state_dir)

    def install_checked(
        fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        check_bundle(content, store)
        return state_dir  # nothing is installed; the value is unused by the runner

    def load_fn(*args: Any, **kwargs: Any) -> Any:
        def load(*_: Any) -> Any:
            from site_node.federation.clientapp import app

            return app

        return load

    runner.install_from_fab = install_checked
    runner.get_load_client_app_fn = load_fn
    args = _parse_args_run_flwr_clientapp().parse_args(argv)
    token = try_obtain_flwr_app_token(args)
    runner.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def write_runner_shim(bin_dir: Path, state_dir: Path) -> Path:
    """Write ``bin_dir/flwr-clientapp`` that runs :func:`guarded_clientapp_main`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "flwr-clientapp"
    shim.write_text(
        f"#!{sys.executable}\n"
        '"""Concord: the site\'s guarded ClientApp runner (generated)."""\n'
        "from pathlib import Path\n"
        "from site_node.federation.processes import guarded_clientapp_main\n"
        f"guarded_clientapp_main(Path({str(state_dir)!r}))\n"
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


def start_supernode(spec: SuperNodeSpec, *, wait: bool = True) -> ManagedProcess:
    """Start ``flower-supernode`` for the site (TLS, authenticated, guarded runner)."""
    run_dir = spec.state_dir / "supernode"
    bin_dir = run_dir / "bin"
    write_runner_shim(bin_dir, spec.state_dir)
    args = [
        flwr_binary("flower-supernode"),
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
    ]
    env = flower_env(run_dir / "flwr-home", path_prefix=bin_dir)
    proc = spawn(f"supernode-{spec.site_id}", args, env=env, log_path=run_dir / "supernode.log")
    if wait:
        try:
            wait_for_port("127.0.0.1", spec.runtime_port, timeout=60.0, proc=proc.proc)
        except FlowerProcessError as exc:
            proc.stop()
            raise FlowerProcessError(str(exc), proc.log_tail()) from None
    return proc
