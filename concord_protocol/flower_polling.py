"""Flower 1.41's fixed waits, shortened in the Flower processes Concord starts.

A round's message wave (ServerApp -> SuperLink -> SuperNodes -> ClientApps and back) took
6-7 s here, most of it waiting rather than working (``benchmarks/round_timing.py``):

* **Object pulls.** A message travels as a tree of objects. Whoever pulls one that is not
  stored yet (a ClientApp asking its SuperNode while the SuperNode is still fetching the
  message from the SuperLink; a SuperNode or the ServerApp asking the SuperLink before the
  sender has pushed everything) retries after ``PULL_INITIAL_BACKOFF`` = 1 s, doubling up to
  10 s (``flwr.supercore.inflatable.inflatable_utils.pull_objects``, and
  ``pull_and_inflate_object_from_tree`` which calls it). :func:`shorten_object_pulls`
  starts at :data:`OBJECT_PULL_BACKOFF_S` instead, doubling up to
  :data:`OBJECT_PULL_BACKOFF_CAP_S`.
* **Idle loops.** The SuperNode sleeps 3 s after a pull that found nothing and 0.5 s while
  it waits for its ClientApp's reply (``flwr.supernode.start_client_internal``):
  :func:`cap_module_sleeps` caps every ``time.sleep`` of such a module. The ServerApp's
  ``HttpGrid.send_and_receive`` waits 3 s between pulls of replies; the ServerApp polls
  itself instead (``consortium_server.federation.serverapp.collect_replies``).

Neither is a Flower option, so this changes Flower's functions' defaults and module globals
in our own processes before Flower runs; each function refuses (:class:`FlowerLayoutError`)
when what it patches is not there any more, so a Flower upgrade fails loudly instead of
bringing the waits back silently. The cost is more loopback requests while waiting: each
retry is one ``PullObject`` call.
"""

from __future__ import annotations

import importlib
import time
import types
from typing import Any

__all__ = [
    "OBJECT_PULL_BACKOFF_CAP_S",
    "OBJECT_PULL_BACKOFF_S",
    "FlowerLayoutError",
    "cap_module_sleeps",
    "shorten_object_pulls",
]

#: The first wait before pulling a not-yet-stored object again (Flower: 1 s).
OBJECT_PULL_BACKOFF_S = 0.05
#: The longest wait between two pulls of one object (Flower: 10 s).
OBJECT_PULL_BACKOFF_CAP_S = 1.0

_INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"
_PULLERS = ("pull_objects", "pull_and_inflate_object_from_tree")


class FlowerLayoutError(RuntimeError):
    """Flower's code is not what a patch here was written for (check before upgrading)."""


def shorten_object_pulls(
    initial_s: float = OBJECT_PULL_BACKOFF_S, cap_s: float = OBJECT_PULL_BACKOFF_CAP_S
) -> None:
    """Make Flower's object pulls retry after ``initial_s``, doubling up to ``cap_s``.

    Changes the keyword defaults of :data:`_PULLERS` in this process (and in processes it
    forks afterwards); callers that pass their own backoff keep it.
    """
    module = importlib.import_module(_INFLATABLE)
    for name in _PULLERS:
        defaults = getattr(getattr(module, name, None), "__kwdefaults__", None)
        if not isinstance(defaults, dict) or not {"initial_backoff", "backoff_cap"} <= set(
            defaults
        ):
            raise FlowerLayoutError(
                f"{_INFLATABLE}.{name} has no initial_backoff/backoff_cap keyword defaults"
            )
        defaults["initial_backoff"] = initial_s
        defaults["backoff_cap"] = cap_s


class _CappedTime(types.ModuleType):
    """The ``time`` module with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, at most :attr:`cap`."""
        time.sleep(min(seconds, self.cap))


def cap_module_sleeps(module_name: str, cap_s: float) -> types.ModuleType:
    """Cap every ``time.sleep`` that module ``module_name`` makes at ``cap_s``; the module.

    The module must use ``import time`` and call ``time.sleep`` (looked up at each call,
    so replacing its global suffices); anything else is :class:`FlowerLayoutError`. Calling
    it again changes the cap.
    """
    module = importlib.import_module(module_name)
    current = getattr(module, "time", None)
    if isinstance(current, _CappedTime):
        current.cap = cap_s
        return module
    if current is not time:
        raise FlowerLayoutError(
            f"{module_name} no longer imports the time module as `time`: check its polling "
            "before upgrading Flower"
        )
    module.time = _CappedTime(cap_s)  # type: ignore[attr-defined]
    return module
