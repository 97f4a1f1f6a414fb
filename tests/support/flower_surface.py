"""Test support for attacks on Flower's process surface: an outsider's Control and Runtime
clients, a hostile (stock) SuperLink that plays a run's primary task itself, attacker app
bundles, and a watcher of every descendant process's arguments and environment.

Used by ``tests/integration/attacks/test_flower_surface.py``. Everything here speaks Flower's
own protocol with Flower's own clients, as an attacker would.
"""

from __future__ import annotations

import re
import ssl
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concord_protocol.processes import (
    ManagedProcess,
    flower_env,
    flwr_binary,
    spawn,
    wait_for_port,
)
from consortium_server.federation.processes import TlsFiles

__all__ = [
    "TOKEN_PATTERN",
    "HostileSuperLink",
    "ProcessWatch",
    "attacker_bundle",
    "control_as",
    "descendants",
    "runtime_as",
    "write_bundle_pyproject",
]

#: A Flower task token: ``secrets.token_hex(FLWR_TASK_TOKEN_LENGTH)`` (128 bytes, 256 hex).
TOKEN_PATTERN = re.compile(r"(?<![0-9a-f])[0-9a-f]{256}(?![0-9a-f])")


def _context(ca_cert: Path, client_cert: Path | None = None, client_key: Path | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(ca_cert))
    if client_cert is not None:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return context


def control_as(
    address: str, ca_cert: Path, *, client_cert: Path | None = None, client_key: Path | None = None
) -> Any:
    """Flower's own Control client (what ``flwr`` uses) against ``address``, trusting
    ``ca_cert`` and presenting ``client_cert`` if given."""
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    return ControlHttpClient(
        f"https://{address}",
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        verify=_context(ca_cert, client_cert, client_key),
        timeout=30.0,
    )


def runtime_as(address: str, *, ca_cert: Path | None, secret: bytes | None = None) -> Any:
    """Flower's own Runtime client against ``address`` (TLS when ``ca_cert``), signing
    ``acquire-task`` with ``secret`` when given (as a SuperExec does)."""
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
            )
        )
    if ca_cert is None:
        return RuntimeHttpClient(f"http://{address}", interceptors=interceptors, verify=False)
    return RuntimeHttpClient(
        f"https://{address}", interceptors=interceptors, verify=_context(ca_cert)
    )


def attacker_bundle(directory: Path, *, marker: Path, components: Mapping[str, str]) -> Path:
    """An app bundle whose every module writes ``marker`` when imported (and whose apps
    write it again when run): if the marker exists, attacker code ran."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    (directory / "evil_server.py").write_text(
        payload + "from flwr.serverapp import ServerApp\napp = ServerApp()\n\n"
        "@app.main()\ndef main(grid, context):\n"
        f"    Path({str(marker)!r}).write_text('ran')\n"
    )
    (directory / "evil_client.py").write_text(
        payload + "from flwr.clientapp import ClientApp\napp = ClientApp()\n\n"
        "@app.train()\ndef train(msg, context):\n"
        f"    Path({str(marker)!r}).write_text('ran')\n"
    )
    (directory / "evil_agent.py").write_text(payload + "app = None\n")
    write_bundle_pyproject(directory, components)
    return directory


def write_bundle_pyproject(directory: Path, components: Mapping[str, str]) -> Path:
    """The ``pyproject.toml`` of a foreign app bundle naming ``components`` (kind -> ref)."""
    lines = "\n".join(f'{kind} = "{ref}"' for kind, ref in components.items())
    path = directory / "pyproject.toml"
    path.write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "innocent-study"
            version = "1.0.0"
            dependencies = []

            [tool.hatch.build.targets.wheel]
            packages = ["."]

            [tool.flwr.app]
            publisher = "someone"

            [tool.flwr.app.components]
            """
        )
        + lines
        + '\n\n[tool.flwr.app.config]\nout = ""\n'
    )
    return path


def fab_request(app_dir: Path, *, user_prompt: str = "") -> Any:
    """The ``StartRunRequest`` ``flwr run`` sends for ``app_dir``."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    content = build_fab_from_disk(app_dir)
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    return StartRunRequest(fab=fab_to_proto(fab), user_prompt=user_prompt)


@dataclass
class HostileSuperLink:
    """A stock ``flower-superlink`` that an attacker runs (or a compromised consortium):
    ``--isolation process`` without a SuperExec secret, so the test plays each run's
    primary task itself; no SuperNode authentication, so any node joins."""

    process: ManagedProcess
    address: str
    tls: TlsFiles

    @classmethod
    def start(cls, work_dir: Path, tls: TlsFiles, *, port: int) -> HostileSuperLink:
        args = [
            flwr_binary("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--isolation",
            "process",
            "--disable-runtime-dependency-installation",
        ]
        proc = spawn(
            "hostile-superlink",
            args,
            env=flower_env(work_dir / "flwr-home"),
            log_path=work_dir / "superlink.log",
        )
        wait_for_port("127.0.0.1", port, timeout=60, proc=proc.proc)
        return cls(proc, f"127.0.0.1:{port}", tls)

    def stop(self) -> None:
        self.process.stop()

    def start_run(self, app_dir: Path, *, user_prompt: str = "") -> int:
        client = control_as(self.address, self.tls.ca_cert)
        try:
            return int(client.StartRun(fab_request(app_dir, user_prompt=user_prompt)).run_id)
        finally:
            client.close()

    def register_node(self, public_key_file: Path) -> int:
        """Register a SuperNode's OpenSSH public key (Flower 1.41 activates only registered
        keys, with or without SuperNode authentication), as ``flwr supernode register``."""
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest

        key = serialization.load_ssh_public_key(public_key_file.read_bytes().strip())
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        client = control_as(self.address, self.tls.ca_cert)
        try:
            return int(client.RegisterNode(RegisterNodeRequest(public_key=pem, name="n")).node_id)
        finally:
            client.close()

    def play_task(self, run_id: int, task_type: str, *, timeout: float = 30.0) -> Any:
        """Acquire the run's pending ``task_type`` task and activate it; an ``HttpGrid``
        that acts as that task (push messages to nodes, pull their replies)."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
        from flwr.superlink.grid import HttpGrid

        runtime = runtime_as(self.address, ca_cert=self.tls.ca_cert)
        deadline = time.monotonic() + timeout
        token = ""
        try:
            while not token and time.monotonic() < deadline:
                res = runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
                if res.HasField("task") and res.task.run_id == run_id:
                    token = res.token
                else:
                    time.sleep(0.2)
        finally:
            runtime.close()
        if not token:
            raise TimeoutError(f"no {task_type} task of run {run_id}")
        grid = HttpGrid(self.address, root_certificates=self.tls.ca_cert.read_bytes(), token=token)
        res = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        grid.set_run(run_from_proto(res.run))
        # Messages take their source from the task identity, as in ``flwr-serverapp``.
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        return grid


def descendants(root: int) -> set[int]:
    """Pids of every live descendant of ``root`` (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@dataclass
class ProcessWatch:
    """Samples the arguments and environment of every descendant of ``root`` (and of
    ``extra_roots``, processes started in sessions of their own) while running."""

    root: int
    interval: float = 0.05
    #: pid -> the arguments it was seen with.
    argv: dict[int, list[str]] = field(default_factory=dict)
    #: pid -> its environment values.
    environ: dict[int, list[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        for pid in descendants(self.root):
            base = Path(f"/proc/{pid}")
            try:
                argv = (base / "cmdline").read_bytes().split(b"\0")
                env = (base / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv != [b""]:
                self.argv[pid] = [a.decode(errors="replace") for a in argv if a]
            self.environ[pid] = [e.decode(errors="replace").partition("=")[2] for e in env if e]

    @contextmanager
    def running(self) -> Iterator[ProcessWatch]:
        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                time.sleep(self.interval)

        thread = threading.Thread(target=loop, name="process-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)

    def commands(self, suffix: str) -> list[list[str]]:
        """Arguments of the processes whose command line mentions ``suffix``."""
        return [argv for argv in self.argv.values() if any(suffix in a for a in argv)]
