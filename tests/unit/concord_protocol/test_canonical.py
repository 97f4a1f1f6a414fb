"""RFC 8785 canonical JSON: the bytes both sides hash."""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess

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


#: RFC 8785 appendix B: IEEE 754 bit patterns and their ECMAScript serialisation.
RFC8785_NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22",
    "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23",
    "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332",
    "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333",
    "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(("bits", "expected"), sorted(RFC8785_NUMBERS.items()))
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert canonical_json(value).decode() == expected


def test_numbers_match_ecmascript_for_random_doubles() -> None:
    """An independent reference: Node's JSON.stringify (ECMAScript Number::toString) on
    4,000 random bit patterns, whole numbers at and above 2^53 among them."""
    rng = random.Random(8785)
    values = [struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0] for _ in range(3000)]
    values += [float(2**e + rng.getrandbits(20) * 2 ** (e - 20)) for e in range(53, 1000, 1)]
    finite = [v for v in values if math.isfinite(v)]
    script = (
        "const h=require('fs').readFileSync(0,'utf8').trim().split('\\n');"
        "console.log(h.map(x=>JSON.stringify(Buffer.from(x,'hex').readDoubleBE(0))).join('\\n'))"
    )
    hexes = "\n".join(struct.pack(">d", v).hex() for v in finite)
    node = shutil.which("node")
    assert node is not None, "node is installed by `make install` (tests/oidc_provider)"
    result = subprocess.run(
        [node, "-e", script], input=hexes, capture_output=True, text=True, check=True
    )
    expected = result.stdout.split()
    assert len(expected) == len(finite)
    mismatches = [
        (v, canonical_json(v).decode(), e)
        for v, e in zip(finite, expected, strict=True)
        if canonical_json(v).decode() != e
    ]
    assert mismatches == []


def test_integers_beyond_2_53_are_the_double_they_denote() -> None:
    """RFC 8785 reads every number as an IEEE double: a larger integer is serialised as
    its double, as a JCS implementation reading the same JSON text would."""
    assert canonical_json(2**53).decode() == "9007199254740992"
    assert canonical_json(2**53 + 1).decode() == "9007199254740992"  # rounds to even
    assert canonical_json(2**68).decode() == "295147905179352830000"
    assert canonical_json(-(2**68)).decode() == "-295147905179352830000"
    assert canonical_json(json.loads("295147905179352830000")) == canonical_json(2**68)
    with pytest.raises(ValueError, match="cannot encode the integer"):
        canonical_json(10**400)


def test_contract_hyperparameters_must_hash_exactly() -> None:
    """The contract refuses the integers and non-finite floats its hash could not hold."""
    from pydantic import ValidationError

    from concord_protocol.contract import ModelSpec

    ModelSpec(name="tabular-mlp", version="1", hyperparameters={"hidden": 2**53})
    for bad in (2**53 + 1, -(2**60), math.nan, math.inf):
        with pytest.raises(ValidationError, match="RFC 8785"):
            ModelSpec(name="tabular-mlp", version="1", hyperparameters={"hidden": bad})
