"""The site's SuperExec: it starts the guarded ClientApp, and nothing else.

``python -m site_node.federation.executor --state-dir DIR --runtime-api-address
127.0.0.1:PORT --insecure --superexec-auth-secret-file F [--parent-pid N]``

A Flower 1.41 SuperNode queues one *task* per message it receives: ``flwr-clientapp``, or
``flwr-agentapp`` when the run's bundle names an AgentApp; a running app may also create
tasks of other kinds (``create-task``). Whatever program a SuperExec starts for a task is
code running at the hospital, with the site's node config, state, keys and data mounted.
So the site runs its SuperNode with ``--isolation process --superexec-auth-secret-file F``
(Flower then starts no SuperExec of its own, and ``acquire-task`` on the SuperNode's local
Runtime API needs an HMAC made with the secret in ``F``), and this executor
(:func:`concord_protocol.superexec.run_executor`) is the only holder of that secret:

* it acquires **only** ``flwr-clientapp`` tasks (:data:`TASK_TYPE`). AgentApp, ServerApp,
  simulation, model and connector tasks are never acquired, so for them nothing is
  installed, imported or started;
* for each ClientApp task it starts the site's generated ``flwr-clientapp`` shim
  (:func:`~site_node.federation.processes.write_runner_shim`, by absolute path), which runs
  the guarded ClientApp in the warm runner: the bundle must be the site's own (or one its
  operator allowed) and only the installed ClientApp is imported;
* the task token goes to the shim as ``--token-file`` (mode 0600, private directory), never
  ``--token``: no token in ``/proc/*/cmdline``. The guarded ClientApp deletes the file once
  read.

A local process without the secret (another container in the pod, any user on the host)
gets 401 from ``acquire-task``, and every other Runtime route needs a task token that only
``acquire-task`` hands out. :func:`executor_args` is the command line
:func:`~site_node.federation.processes.start_supernode` and ``site-node supernode`` use.
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

__all__ = ["TASK_TYPE", "executor_args", "main", "shim_path"]

#: The one task type the site's executor acquires.
TASK_TYPE = "flwr-clientapp"


def shim_path(state_dir: Path) -> Path:
    """The site's guarded ``flwr-clientapp`` (written by ``write_runner_shim``)."""
    return state_dir / "supernode" / "bin" / "flwr-clientapp"


def executor_args(
    state_dir: Path,
    *,
    runtime_api_address: str,
    secret_file: Path,
    root_certificates: Path | None = None,
    parent_pid: int | None = None,
) -> list[str]:
    """``argv`` of the site's executor (this module, run by this interpreter)."""
    args = [
        sys.executable,
        "-m",
        "site_node.federation.executor",
        "--state-dir",
        str(state_dir),
        "--runtime-api-address",
        runtime_api_address,
        "--superexec-auth-secret-file",
        str(secret_file),
    ]
    args += (
        ["--insecure"]
        if root_certificates is None
        else ["--root-certificates", str(root_certificates)]
    )
    if parent_pid is not None:
        args += ["--parent-pid", str(parent_pid)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the site's executor until SIGTERM or until its parent exits."""
    parser = argparse.ArgumentParser(description="The site's SuperExec (ClientApp tasks only).")
    parser.add_argument("--state-dir", type=Path, required=True, help="The site's state dir.")
    add_executor_args(parser)
    args = parser.parse_args(argv)
    configure_logging()
    shim = shim_path(args.state_dir).resolve()
    try:
        if not shim.is_file():
            raise ExecutorError(f"the site's flwr-clientapp shim is missing ({shim})")
        config = config_from_args(args, task_type=TASK_TYPE, command=[str(shim)])
        return run_executor(config)
    except ExecutorError as exc:
        print(f"concord executor: {exc.code}: {exc.diagnostics()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
