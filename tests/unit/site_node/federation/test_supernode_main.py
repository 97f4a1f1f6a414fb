"""The SuperNode entry point: Flower's own loop, with its fixed 3 s and 0.5 s sleeps capped
at POLL_S, and a refusal to start on a Flower whose loop it no longer understands."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from concord_protocol.flower_polling import FlowerLayoutError, cap_module_sleeps
from site_node.federation import supernode_main
from site_node.federation.supernode_main import POLL_S, SUPERNODE_LOOP, patch_polling

FLOWER_LOOP = SUPERNODE_LOOP


def _sleeps(module: types.ModuleType) -> list[float]:
    """The constant arguments of every ``time.sleep(...)`` call in ``module``'s source."""
    tree = ast.parse(inspect.getsource(module))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "sleep"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "time"
        ):
            arg = node.args[0]
            assert isinstance(arg, ast.Constant)
            assert isinstance(arg.value, int | float)
            found.append(float(arg.value))
    return found


def test_flowers_loop_still_sleeps_what_the_patch_was_written_for() -> None:
    # A Flower upgrade that changes these must be looked at: the patch caps them all.
    module = importlib.import_module(FLOWER_LOOP)
    assert sorted(_sleeps(module)) == [0.5, 0.5, 3.0]


def test_the_patch_caps_every_sleep_of_the_loop_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = importlib.import_module(FLOWER_LOOP)
    monkeypatch.setattr(module, "time", time)
    patch_polling(0.05)
    started = time.monotonic()
    module.time.sleep(3)  # what the loop does after an empty pull
    assert time.monotonic() - started < 1.0
    assert module.time.monotonic is time.monotonic  # the rest of the module is untouched
    assert time.sleep is not module.time.sleep  # the real time module is not patched
    assert cap_module_sleeps(FLOWER_LOOP, 0.1) is module  # re-caps, does not wrap twice
    assert module.time.cap == 0.1


def test_a_loop_without_the_time_module_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(FLOWER_LOOP)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(sleep=lambda s: None))
    with pytest.raises(FlowerLayoutError, match="before upgrading Flower"):
        patch_polling()


def test_the_entry_point_is_flowers_cli_with_its_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "site_node.federation.supernode_main", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: flower-supernode")
    assert "--superlink" in result.stdout
    assert POLL_S <= 0.5
    assert Path(supernode_main.__file__).name == "supernode_main.py"
