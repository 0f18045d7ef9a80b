"""Canonical JSON (RFC 8785, JCS) for ledger records, receipts and anything else that is signed.

Records only ever hold objects, arrays, strings, booleans, null and integers within +/-(2**53 - 1),
so the number rules of RFC 8785 reduce to plain decimal integers. Floats are refused: a float in a
signed record is a bug (times are integer microseconds, coordinates integer micro-degrees).
"""

from __future__ import annotations

import json
from typing import Any

MAX_SAFE_INTEGER = 2**53 - 1

_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class CanonicalJSONError(ValueError):
    """A value that cannot be part of a signed record."""


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _SHORT_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise CanonicalJSONError(f"lone surrogate U+{ord(ch):04X} in string {s!r}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be")


def _encode(value: Any, path: str, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CanonicalJSONError(f"{path}: integer {value} is outside +/-(2**53-1) (RFC 8785)")
        out.append(str(value))
    elif isinstance(value, float):
        raise CanonicalJSONError(f"{path}: float {value!r} not allowed in signed records; use integers")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_check_key(path))):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(value[key], f"{path}.{key}", out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, f"{path}[{i}]", out)
        out.append("]")
    else:
        raise CanonicalJSONError(f"{path}: {type(value).__name__} is not a JSON value")


def _check_key(path: str):
    def key(k: Any) -> bytes:
        if not isinstance(k, str):
            raise CanonicalJSONError(f"{path}: object key {k!r} is not a string")
        return _utf16_key(k)

    return key


def canonical_bytes(value: Any) -> bytes:
    """Return the RFC 8785 serialisation of `value` as UTF-8 bytes."""
    out: list[str] = []
    try:
        _encode(value, "$", out)
    except RecursionError:
        raise CanonicalJSONError("value is nested too deeply to encode") from None
    return "".join(out).encode("utf-8")


def parse_canonical(data: bytes) -> Any:
    """Parse `data` and insist it is already in canonical form (re-encoding gives the same bytes)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_float=_reject_float, parse_constant=_reject_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanonicalJSONError(f"not valid JSON: {exc}") from exc
    except RecursionError:  # hostile input such as 100 000 nested arrays: an error, never a crash
        raise CanonicalJSONError("JSON is nested too deeply") from None
    if canonical_bytes(value) != data:
        raise CanonicalJSONError("JSON is valid but not in RFC 8785 canonical form")
    return value


def _reject_float(token: str) -> Any:
    raise CanonicalJSONError(f"non-integer number {token} not allowed in signed records")
