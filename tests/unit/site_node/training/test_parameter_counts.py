"""The catalogue's parameter counts (shared, no torch) are the networks the site builds.

The consortium server sizes a study's encrypted updates from
:func:`concord_protocol.catalogue.parameter_count` without building a model; a count that
disagrees with the site's network would make every update the wrong length. So every entry
is built here over hyperparameters and input shapes drawn by hypothesis, and both sides
must agree on the count or refuse the same input with the same error code.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concord_protocol.catalogue import CatalogueEntry, HyperParameter, list_models, parameter_count
from concord_protocol.contract import ModelSpec
from concord_protocol.errors import ConcordError
from site_node.training.catalogue import build_model

#: Keep the networks small enough to build quickly on two cores.
_WIDTH_CAPS = {
    "hidden": 48,
    "base_channels": 12,
    "init_features": 16,
    "growth_rate": 12,
    "init_filters": 8,
    "levels": 4,
}


def _value(parameter: HyperParameter) -> st.SearchStrategy[Any]:
    if parameter.choices is not None:
        return st.sampled_from(parameter.choices)
    low = parameter.minimum if parameter.minimum is not None else 0
    high = parameter.maximum if parameter.maximum is not None else 8
    if parameter.type == "int":
        return st.integers(int(low), min(int(high), _WIDTH_CAPS.get(parameter.name, int(high))))
    if parameter.type == "float":
        return st.floats(float(low), min(float(high), 0.5))
    return st.booleans()


def _shape(entry: CatalogueEntry) -> st.SearchStrategy[tuple[int, ...]]:
    if entry.modality == "tabular":
        return st.tuples(st.integers(1, 40))
    channels = st.integers(1, 3)
    if entry.task == "segmentation":  # mostly sides that fit an encoder-decoder
        return st.one_of(
            st.builds(lambda c, k: (c, 8 * k, 8 * k), channels, st.integers(1, 5)),
            st.builds(lambda c, k: (c, 8 * k, 8 * k + 8), channels, st.integers(1, 3)),
            st.builds(lambda c, k: (c, 8 * k, 8 * k, 8 * k), channels, st.integers(1, 2)),
            st.builds(lambda c, s: (c, s, s), channels, st.integers(4, 40)),
        )
    return st.one_of(
        st.builds(lambda c, s: (c, s, s), channels, st.integers(4, 40)),
        st.builds(lambda c, s: (c, s, s + 3), channels, st.integers(4, 24)),
        st.builds(lambda c, s: (c, s, s, s), channels, st.integers(4, 18)),
    )


def _outcome(call: Any) -> int | tuple[str, str]:
    try:
        return int(call())
    except ConcordError as exc:
        return ("refused", exc.code)


@pytest.mark.parametrize("entry", list_models(), ids=lambda e: f"{e.name}-v{e.version}")
def test_shared_count_is_the_built_networks(entry: CatalogueEntry) -> None:
    hyper = st.fixed_dictionaries({h.name: _value(h) for h in entry.hyperparameters})

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(hyper, _shape(entry), st.integers(2, 5))
    def check(hp: dict[str, Any], shape: tuple[int, ...], classes: int) -> None:
        spec = ModelSpec(name=entry.name, version=entry.version, hyperparameters=hp)
        shared = _outcome(lambda: parameter_count(spec, input_shape=shape, num_classes=classes))
        built = _outcome(
            lambda: sum(
                p.numel()
                for p in build_model(spec, input_shape=shape, num_classes=classes).parameters()
            )
        )
        assert shared == built, (hp, shape, classes)

    check()


def test_defaults_of_the_demo_model() -> None:
    spec = ModelSpec(name="tabular-mlp", version="1")
    # 30 features -> 64 -> 64 -> 2: (30*64+64) + (64*64+64) + (64*2+2).
    assert parameter_count(spec, input_shape=(30,), num_classes=2) == 6274
