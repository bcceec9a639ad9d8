"""RFC 8785 (JSON Canonicalization Scheme) for the values audit records hold.

Other languages must be able to recompute a record's hash, so the bytes hashed are
JCS: object members sorted by their names' UTF-16 code units, no whitespace, strings
with only the escapes JSON requires (`"`, `\\`, and control characters below U+0020,
as `\\b \\t \\n \\f \\r` or `\\u00xx`), and numbers as ECMAScript's
`Number.prototype.toString` prints them (`0` not `0.0`, `1e-7` not `1e-07`,
`0.00001` not `1e-05`). In JavaScript that is `JSON.stringify` over an object with
sorted keys; `docs/audit.md` shows it and `docs/audit-test-vectors.json` pins it.

Why not the `rfc8785` package: it costs ~45 µs per record in pure Python, twice per
append, at thousands of appends a second. This implementation leans on the C
`json` encoder for strings (whose escaping is exactly JCS's) and is checked against
`rfc8785` and against Node.js in the tests.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["CanonicalError", "canonical", "es_number"]

# ECMAScript numbers are IEEE doubles: an integer beyond 2**53 would silently change.
_MAX_SAFE_INTEGER = 2**53 - 1
_string = json.JSONEncoder(ensure_ascii=False).encode  # C-accelerated; escapes as JCS does


class CanonicalError(ValueError):
    """A value JCS cannot represent exactly (NaN, infinity, a huge integer, a non-JSON type)."""


def es_number(value: float) -> str:
    """A finite double as ECMAScript prints it (ECMA-262 Number::toString, radix 10).

    `repr` gives the shortest digits that round-trip, as ECMAScript requires; only the
    layout differs (where Python and JavaScript switch to exponent notation).
    """
    if not math.isfinite(value):
        raise CanonicalError(f"{value!r} has no JSON form")
    if value == 0:
        return "0"  # also -0.0: ECMAScript prints "0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    if fraction == "0":
        fraction = ""
    digits = (whole + fraction).lstrip("0")
    # n: the position of the decimal point relative to the digits (value = 0.d1d2… × 10^n)
    n = (
        len(whole) + int(exponent or 0)
        if whole != "0"
        else int(exponent or 0) - (len(fraction) - len(fraction.lstrip("0")))
    )
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + text


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise CanonicalError(f"integer {value} is beyond 2**53 - 1 and would change in JSON")
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(es_number(value))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError(f"object key {key!r} is not a string")
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16)):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise CanonicalError(f"{type(value).__name__} {value!r} has no JSON form")


def _utf16(key: str) -> bytes:
    # JCS sorts by UTF-16 code units; they differ from code points only above U+FFFF.
    return key.encode("utf-16-be")


def canonical(value: Any) -> bytes:
    """The RFC 8785 bytes of `value` (UTF-8)."""
    if type(value) is dict:
        flat = _flat(value)
        if flat is not None:
            return flat
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")


_dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def _flat(record: dict) -> bytes | None:
    """The fast path for what audit records are: one flat object with ASCII keys.

    There the C encoder's output *is* JCS — code-point order equals UTF-16 order for
    ASCII keys, and its string escaping is JCS's — once every float prints as
    ECMAScript prints it: integral floats become ints (0.0 → 0), and a float whose
    `repr` has no exponent already reads the same in both languages. Anything else
    (an exponent, a nested value, a non-ASCII key) returns None: the general encoder.
    """
    out = {}
    for key, value in record.items():
        if type(key) is not str or not key.isascii():
            return None
        kind = type(value)
        if kind is float:
            if value.is_integer() and abs(value) <= _MAX_SAFE_INTEGER:
                value = int(value)
            elif not math.isfinite(value) or value.is_integer() or "e" in repr(value):
                return None
        elif kind is int:
            if abs(value) > _MAX_SAFE_INTEGER:
                return None
        elif not (kind is str or kind is bool or value is None):
            return None
        out[key] = value
    return _dumps(out).encode("utf-8")
