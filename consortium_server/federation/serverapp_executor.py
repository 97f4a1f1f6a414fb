"""The SuperLink's SuperExec: it starts the guarded ServerApp, and nothing else.

``python -m consortium_server.federation.serverapp_executor --runtime-api-address
127.0.0.1:PORT --root-certificates CA --superexec-auth-secret-file F [--parent-pid N]
[--allow HASH=module:attr ...]``

The Concord SuperLink (:mod:`~consortium_server.federation.superlink_launcher`) runs
Flower with ``--isolation process --superexec-auth-secret-file F``, so Flower starts no
SuperExec and ``acquire-task`` on the (loopback) Runtime API needs an HMAC made with the
secret. The launcher starts this executor as its child with the same secret file
(:func:`concord_protocol.superexec.run_executor`):

* it acquires only ``flwr-serverapp`` tasks. A run whose bundle names an AgentApp has an
  ``flwr-agentapp`` primary task, which is never acquired: nothing runs for it at the
  SuperLink, so no message of that run reaches any site;
* it starts :mod:`~consortium_server.federation.guarded_serverapp` (this interpreter, by
  absolute path) with the token in a private file (``--token-file``), never in argv. That
  program runs only Concord's bundle (or an operator-allowed one, ``--allow``) and imports
  the installed ServerApp.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from concord_protocol.superexec import (
    ExecutorError,
    add_executor_args,
    config_from_args,
    configure_logging,
    run_executor,
)

__all__ = ["TASK_TYPE", "executor_args", "main"]

#: The one task type the SuperLink's executor acquires.
TASK_TYPE = "flwr-serverapp"


def executor_args(
    *,
    runtime_api_address: str,
    secret_file: Path,
    root_certificates: Path,
    parent_pid: int | None = None,
    allow: Sequence[str] = (),
) -> list[str]:
    """``argv`` of the SuperLink's executor (this module, run by this interpreter);
    ``allow`` are extra ``HASH=module:attr`` bundles for the guarded ServerApp."""
    args = [
        sys.executable,
        "-m",
        "consortium_server.federation.serverapp_executor",
        "--runtime-api-address",
        runtime_api_address,
        "--superexec-auth-secret-file",
        str(secret_file),
        "--root-certificates",
        str(root_certificates),
    ]
    if parent_pid is not None:
        args += ["--parent-pid", str(parent_pid)]
    for entry in allow:
        args += ["--allow", entry]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the SuperLink's executor until SIGTERM or until its parent exits."""
    parser = argparse.ArgumentParser(description="The SuperLink's SuperExec (ServerApps only).")
    add_executor_args(parser)
    parser.add_argument(
        "--allow", action="append", default=[], help="HASH=module:attr of an extra bundle."
    )
    args = parser.parse_args(argv)
    configure_logging()
    command = [sys.executable, "-m", "consortium_server.federation.guarded_serverapp"]
    for entry in args.allow:
        command += ["--allow", entry]
    try:
        return run_executor(config_from_args(args, task_type=TASK_TYPE, command=command))
    except ExecutorError as exc:
        print(f"concord executor: {exc.code}: {exc.diagnostics()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
