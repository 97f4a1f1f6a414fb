"""The server installs on its own: ``pip install '.[server]'`` in a fresh virtual environment
brings no torch, MONAI or Opacus, and ``consortium server`` starts from it.

The install is a regular (not editable) one of what the server image copies (the shared
package, the server, the policies), so the shipped policies must come from the wheel's data
files, not from the repository, and nothing of the site can be there to import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.flower import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server-install")
    # What an image build copies (and no build output lands in the checkout).
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("concord_protocol", "consortium_server", "policies"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    result = subprocess.run([*pip, f"{REPO}[server]"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return venv


def _python(venv: Path, code: str) -> str:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # not the checkout: nothing may come from the repository
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_server_extra_brings_no_torch(server_venv: Path) -> None:
    found = _python(
        server_venv,
        "import importlib.util as u; "
        "print(*[m for m in ('torch', 'monai', 'opacus', 'sklearn') if u.find_spec(m)])",
    )
    assert found == ""
    # Loading the whole server (every router, the ServerApp) imports none of them either.
    loaded = _python(
        server_venv,
        "import sys, consortium_server.main, consortium_server.federation.serverapp; "
        "print(*sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'monai', 'opacus', 'site_node'}))",
    )
    assert loaded == ""


def test_consortium_server_starts_from_the_server_install(
    server_venv: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "PATH": f"{server_venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CONCORD_DATA_DIR": str(tmp_path / "data"),
        "CONCORD_API__PORT": str(port),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(server_venv / "bin" / "consortium"), "server"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = started + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        assert ready, proc.stdout.read().decode()[-4000:] if proc.stdout else ""
        print(f"\nconsortium server ready in {time.monotonic() - started:.1f} s")
        policy = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5)
        assert policy.status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    # The policies were seeded from the wheel's data files.
    assert (server_venv / "share" / "policies" / "schema.cedarschema").is_file()


def test_the_demo_says_what_it_needs_in_a_server_install(server_venv: Path) -> None:
    result = subprocess.run(
        [str(server_venv / "bin" / "consortium"), "demo", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={**os.environ, "PATH": f"{server_venv / 'bin'}:/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "install both" in result.stdout + result.stderr
