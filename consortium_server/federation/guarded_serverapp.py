"""The SuperLink's ``flwr-serverapp``: only Concord's bundle, only the installed ServerApp.

``python -m consortium_server.federation.guarded_serverapp [--allow HASH=module:attr ...]
--runtime-api-address 127.0.0.1:PORT --token-file F --root-certificates CA``

Why: Flower's ``flwr-serverapp`` installs the run's app bundle (FAB) and imports the
ServerApp that the bundle's ``pyproject.toml`` names, from the bundle. Whoever can start a
run would run code in the SuperLink's pod, next to the federation token. Concord's
executor (:mod:`~consortium_server.federation.serverapp_executor`) starts this program
instead. It runs Flower's own ``run_serverapp`` with two changes:

* before anything is installed, the FAB must hash to Concord's bundle
  (:func:`concord_protocol.bundle.bundle_hash`) or to a hash the operator allowed
  (``--allow``), hold nothing but its configuration, and name exactly the ServerApp allowed
  for that hash (:func:`check_serverapp_bundle`); anything else fails the run with
  ``federation.bundle_not_allowed`` in its status details, and nothing was imported;
* the ServerApp is imported from the installed packages (``module:attr``), never from the
  bundle's directory (:func:`load_serverapp`).

The token comes by ``--token-file`` (Flower's own option); the file is deleted once read.
Runtime dependency installation is always off. ``tests/unit/consortium_server/federation``
pins the Flower names this replaces.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli

from concord_protocol.bundle import SERVERAPP_REF, bundle_hash
from concord_protocol.flower_polling import shorten_object_pulls
from consortium_server.errors import DomainError

__all__ = [
    "ServerAppBundleRefusedError",
    "allowed_serverapps",
    "check_serverapp_bundle",
    "guarded_serverapp_main",
    "load_serverapp",
    "main",
]

_ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


class ServerAppBundleRefusedError(DomainError):
    """The run's bundle is not Concord's (or one the operator allowed): nothing runs."""

    code = "federation.bundle_not_allowed"


def allowed_serverapps(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Bundle hash -> ServerApp reference: Concord's bundle, plus ``extra``."""
    allowed = dict(extra or {})
    allowed[bundle_hash()] = SERVERAPP_REF
    return allowed


def check_serverapp_bundle(content: bytes, allowed: Mapping[str, str]) -> str:
    """The ServerApp reference for an allowed FAB; raises :class:`ServerAppBundleRefusedError`.

    Reads the archive's listing and its ``pyproject.toml`` only: nothing is extracted,
    installed or imported here.
    """
    digest = hashlib.sha256(content).hexdigest()
    expected = allowed.get(digest)
    if expected is None:
        raise ServerAppBundleRefusedError(
            f"app bundle {digest[:16]} is not allowed on this SuperLink"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            if not set(archive.namelist()) <= _ALLOWED_FILES:
                raise ServerAppBundleRefusedError(
                    "app bundle holds files other than its configuration"
                )
            config = tomli.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomli.TOMLDecodeError):
        raise ServerAppBundleRefusedError("app bundle is not a readable FAB") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if set(components) - {"serverapp", "clientapp"} or components.get("serverapp") != expected:
        raise ServerAppBundleRefusedError(
            f"app bundle {digest[:16]} names other components than allowed for it"
        )
    return expected


def load_serverapp(ref: str) -> Any:
    """Import the ServerApp ``module:attr`` from the installed packages."""
    from flwr.serverapp import ServerApp

    module_name, _, attribute = ref.partition(":")
    if not module_name or not attribute:
        raise ServerAppBundleRefusedError(f"{ref!r} is not a module:attribute reference")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not isinstance(target, ServerApp):
        raise ServerAppBundleRefusedError(f"{ref} is not a ServerApp")
    return target


def guarded_serverapp_main(allowed: Mapping[str, str], argv: Sequence[str] | None = None) -> None:
    """Flower's ``flwr-serverapp`` with the bundle check (see the module)."""
    from queue import Queue

    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.superlink.cli.flwr_serverapp import _parse_args_run_flwr_serverapp

    # The module, not the function of the same name that flwr.superlink.runtime re-exports.
    runner: Any = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    real_install = runner.install_from_fab
    real_run = runner.run_
    accepted: list[str] = []

    def install_checked(
        fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        accepted.append(check_serverapp_bundle(content, allowed))
        return Path(real_install(content, install_dir, skip_prompt))

    def run_installed(*, grid: Any, server_app_dir: str, server_app_attr: str, context: Any) -> Any:
        if len(accepted) != 1 or server_app_attr != accepted[0]:
            raise ServerAppBundleRefusedError("no checked app bundle to load a ServerApp for")
        return real_run(
            grid=grid,
            context=context,
            server_app_dir=server_app_dir,
            loaded_server_app=load_serverapp(accepted[0]),
        )

    runner.install_from_fab = install_checked
    runner.run_ = run_installed
    args = _parse_args_run_flwr_serverapp().parse_args(list(argv) if argv is not None else None)
    token = try_obtain_flwr_app_token(args)
    if args.token_file:  # the executor's private copy: read once, then gone
        Path(args.token_file).unlink(missing_ok=True)
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    try:
        runner.run_serverapp(
            runtime_api_address=args.runtime_api_address,
            log_queue=log_queue,
            token=token,
            insecure=args.insecure,
            certificates=validate_and_resolve_root_certificates(
                args.root_certificates, args.insecure
            ),
            parent_pid=args.parent_pid,
            runtime_dependency_install=False,
        )
    finally:
        restore_output()


def _parse_allow(value: str) -> tuple[str, str]:
    digest, sep, ref = value.partition("=")
    if not sep or len(digest) != 64 or not ref:
        raise argparse.ArgumentTypeError("expected SHA256HEX=module:attribute")
    return digest.lower(), ref


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``--allow HASH=module:attr`` (repeatable), then Flower's arguments."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--allow", type=_parse_allow, action="append", default=[])
    ours, flower_args = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    shorten_object_pulls()  # replies are pulled from the SuperLink as objects
    guarded_serverapp_main(allowed_serverapps(dict(ours.allow)), flower_args)


if __name__ == "__main__":
    main()
