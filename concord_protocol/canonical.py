"""Canonical JSON (RFC 8785, JSON Canonicalization Scheme) and SHA-256 digests of it.

Both sides hash the same bytes: the study contract hash that every site approves and
the audit-log entry encoding are computed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MAX_EXACT_INTEGER", "canonical_json", "hashable_problem", "sha256_hex"]

#: The largest integer magnitude an IEEE double (an RFC 8785 number) holds exactly, with
#: every integer below it: 2^53.
MAX_EXACT_INTEGER = 2**53


def hashable_problem(value: Any, *, max_depth: int = 64) -> str | None:
    """Why ``value`` cannot be hashed exactly, or None: nesting deeper than ``max_depth``,
    text that is not valid Unicode (a lone surrogate has no UTF-8 form), a float that is
    not finite, an integer beyond 2^53 (two such integers share one RFC 8785 number).
    Iterative, so a hostile depth cannot exhaust the stack; for validators of input that
    is hashed later."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"nests deeper than {max_depth} levels"
        if isinstance(item, Mapping):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, list | tuple):
            stack.extend((part, depth + 1) for part in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "holds text that is not valid Unicode"
        elif isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite (RFC 8785 has no NaN or Infinity)"
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_EXACT_INTEGER:
            return "integers must lie within +-2^53 (RFC 8785)"
    return None


def _number(value: float) -> str:
    """Serialise a float the way ECMAScript's Number.prototype.toString does (RFC 8785 3.2.2.3).

    Whole numbers go through the same shortest-digits layout as the rest: at or above 2^53
    a double's exact integer value (``int(value)``) has more digits than ECMAScript prints
    (2^68 is ``295147905179352830000``, not ``295147905179352825856``).
    """
    if not math.isfinite(value):
        raise ValueError("canonical JSON cannot encode NaN or Infinity")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # repr gives the shortest round-tripping digits; re-layout them per ECMAScript.
    mantissa, _, exp_part = repr(abs(value)).partition("e")
    exponent = int(exp_part) if exp_part else 0
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    # n: position of the decimal point relative to the first significant digit.
    leading_zeros = len(int_part + frac_part) - len((int_part + frac_part).lstrip("0"))
    n = len(int_part) + exponent - leading_zeros
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    exp_text = f"e+{e}" if e > 0 else f"e-{-e}"
    if k == 1:
        return sign + digits + exp_text
    return sign + digits[0] + "." + digits[1:] + exp_text


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) <= MAX_EXACT_INTEGER:
            out.append(str(value))
        else:
            # An RFC 8785 number is an IEEE double: a larger integer is the double nearest
            # to it, serialised as ECMAScript would (what a JCS verifier computes from the
            # same JSON text). Neighbouring integers share that double, so inputs whose
            # exact value matters (contract hyperparameters) are bounded to +-2^53 first.
            try:
                out.append(_number(float(value)))
            except OverflowError:
                raise ValueError(f"canonical JSON cannot encode the integer {value}") from None
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Mapping):
        out.append("{")
        # RFC 8785 sorts keys by their UTF-16 code units.
        items = sorted(value.items(), key=lambda kv: str(kv[0]).encode("utf-16-be"))
        for index, (key, item) in enumerate(items):
            if not isinstance(key, str):
                raise TypeError(f"canonical JSON keys must be strings, got {type(key).__name__}")
            if index:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"canonical JSON cannot encode {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 encoding of a JSON-compatible value."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


def sha256_hex(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value``, as lowercase hex."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
