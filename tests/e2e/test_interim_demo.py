"""`make demo` (interim): the server on the embedded defaults, three hospitals enrolled with
real keys, a study submitted and approved through the CLIs. Runs the script itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_script_submits_and_approves_a_study(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "CONCORD_DEMO_PORT": str(_free_port()),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.count("enrolled hospital-") == 3
    assert out.count("published bc-hospital-") == 3
    assert "state:         approved" in out
    assert "Every site approved" in out
    assert "ALLOW" in out  # the dry run
    assert "reserved 3" in out  # the budget reservation
    assert "OK:" in out  # the audit log verified
