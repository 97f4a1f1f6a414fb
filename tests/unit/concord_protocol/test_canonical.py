"""RFC 8785 canonical JSON: the bytes both sides hash."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from concord_protocol.canonical import canonical_json, sha256_hex


def test_rfc8785_number_examples() -> None:
    # From RFC 8785 appendix B (IEEE 754 -> ECMAScript serialisation).
    cases = {
        -0.0: "0",
        1e-7: "1e-7",
        1e-6: "0.000001",
        1e21: "1e+21",
        1e20: "100000000000000000000",
        333333333.3333333: "333333333.3333333",
        5e-324: "5e-324",
        1.7976931348623157e308: "1.7976931348623157e+308",
        9007199254740994.0: "9007199254740994",
        4.5: "4.5",
        0.002: "0.002",
    }
    for value, expected in cases.items():
        assert canonical_json(value).decode() == expected, value


def test_keys_sorted_by_utf16_and_no_whitespace() -> None:
    value = {"b": [1, 2, {"y": None, "x": True}], "a": "é\n", "\u20ac": 1, "\U0001f600": 2}
    out = canonical_json(value).decode()
    # U+20AC sorts before U+1F600, whose UTF-16 form starts with the surrogate 0xD83D.
    assert out == '{"a":"é\\n","b":[1,2,{"x":true,"y":null}],"€":1,"😀":2}'


def test_refuses_nan_and_non_json() -> None:
    with pytest.raises(ValueError, match="NaN"):
        canonical_json({"x": math.nan})
    with pytest.raises(TypeError):
        canonical_json({"x": b"bytes"})
    with pytest.raises(TypeError):
        canonical_json({1: "int key"})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_round_trips_through_json_and_is_stable(value: object) -> None:
    encoded = canonical_json(value)
    decoded = json.loads(encoded)
    assert canonical_json(decoded) == encoded
    assert sha256_hex(decoded) == sha256_hex(value)
