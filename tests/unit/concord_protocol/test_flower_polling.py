"""Flower's object-pull backoff, shortened: a puller retries an object that is not stored
yet after 50 ms (Flower: 1 s, doubling to 10 s), and a changed Flower is refused."""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Iterator

import pytest

from concord_protocol import flower_polling
from concord_protocol.flower_polling import (
    OBJECT_PULL_BACKOFF_CAP_S,
    OBJECT_PULL_BACKOFF_S,
    FlowerLayoutError,
    shorten_object_pulls,
)

INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"


@pytest.fixture
def pulls() -> Iterator[types.ModuleType]:
    module = importlib.import_module(INFLATABLE)
    saved = {name: dict(getattr(module, name).__kwdefaults__) for name in flower_polling._PULLERS}
    yield module
    for name, defaults in saved.items():
        getattr(module, name).__kwdefaults__.update(defaults)


def test_flowers_pull_defaults_are_what_the_patch_was_written_for(
    pulls: types.ModuleType,
) -> None:
    for name in flower_polling._PULLERS:
        params = inspect.signature(getattr(pulls, name)).parameters
        assert params["initial_backoff"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["backoff_cap"].kind is inspect.Parameter.KEYWORD_ONLY


def test_an_object_not_stored_yet_is_pulled_again_after_the_short_backoff(
    pulls: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    shorten_object_pulls()
    assert pulls.pull_objects.__kwdefaults__["initial_backoff"] == OBJECT_PULL_BACKOFF_S
    assert pulls.pull_objects.__kwdefaults__["backoff_cap"] == OBJECT_PULL_BACKOFF_CAP_S
    waits: list[float] = []
    real_wait = pulls.threading.Event.wait

    def wait(self: object, timeout: float | None = None) -> bool:
        if timeout is not None:
            waits.append(timeout)
            timeout = 0.0
        return bool(real_wait(self, timeout))

    monkeypatch.setattr(pulls.threading.Event, "wait", wait)
    tries = {"n": 0}

    def pull(object_id: str) -> bytes:
        tries["n"] += 1
        if tries["n"] < 6:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pulls.pull_objects(["obj"], pull) == {"obj": b"content"}
    assert len(waits) == 5
    assert waits[0] <= OBJECT_PULL_BACKOFF_S * 1.2  # Flower's jitter is +-20 %
    assert max(waits) <= OBJECT_PULL_BACKOFF_CAP_S * 1.2


def test_a_flower_without_the_backoff_keywords_is_refused(
    pulls: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pulls, "pull_objects", lambda ids, fn: {})
    with pytest.raises(FlowerLayoutError, match="initial_backoff"):
        shorten_object_pulls()
