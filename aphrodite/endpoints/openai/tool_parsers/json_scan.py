"""Reading JSON that is still being generated: the part of a value known for sure, already in the
form ``json.dumps(value, ensure_ascii=False)`` gives the whole value.

Tool calls stream their arguments piece by piece, and the pieces a client concatenates must end up
equal to the arguments of the same call answered whole. So the streamed text is not the model's raw
characters (``{"a":1}``, ``"\\u00e9"``, ``1.50``) but their canonical serialization (``{"a": 1}``,
``"é"``, ``1.5``), cut where the model's text stops being certain: an unfinished number, literal or
escape sequence is held back until it ends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["ScannedValue", "scan_value", "skip_ws"]

_WS = " \t\n\r"
_NUMBER_CHARS = frozenset("+-0123456789.eE")
_LITERALS = ("true", "false", "null")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass
class ScannedValue:
    """``canonical``: the certain part of the value, canonically serialized; ``end``: the index just
    past the value in the scanned text, None while it is unfinished; ``valid``: False once the text
    cannot be JSON any more."""

    canonical: str
    end: int | None
    valid: bool = True


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _encode_char(c: str) -> str:
    return json.dumps(c, ensure_ascii=False)[1:-1]


def scan_string(text: str, i: int) -> tuple[str, str, int | None, bool]:
    """The JSON string starting at ``text[i] == '"'``: (decoded so far, canonical so far, end, valid)."""
    out: list[str] = []
    j = i + 1
    n = len(text)
    while j < n:
        c = text[j]
        if c == '"':
            s = "".join(out)
            return s, json.dumps(s, ensure_ascii=False), j + 1, True
        if c == "\\":
            if j + 1 >= n:
                break
            e = text[j + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                j += 2
                continue
            if e != "u":
                return "".join(out), "", None, False
            if j + 6 > n:
                break
            try:
                code = int(text[j + 2:j + 6], 16)
            except ValueError:
                return "".join(out), "", None, False
            if 0xD800 <= code < 0xDC00:  # a high surrogate: its low half follows as another escape
                if j + 12 > n:
                    break
                if text[j + 6:j + 8] != "\\u":
                    return "".join(out), "", None, False
                try:
                    low = int(text[j + 8:j + 12], 16)
                except ValueError:
                    return "".join(out), "", None, False
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                j += 12
                continue
            out.append(chr(code))
            j += 6
            continue
        out.append(c)  # raw control characters too: models write newlines, read leniently (strict=False)
        j += 1
    s = "".join(out)
    return s, '"' + "".join(_encode_char(ch) for ch in s), None, True


def scan_value(text: str, i: int) -> ScannedValue:
    """The JSON value starting at ``text[i]`` (after whitespace); its grammar is checked as it goes."""
    parts: list[str] = []
    stack: list[str] = []   # "{" or "[" of the open containers
    # What may come next: "value", "value]" (a value or the end of an empty list), "key}" (a key or the
    # end of an empty object), "key", ":", or "," (a comma or the end of the container).
    want = "value"
    j = skip_ws(text, i)
    n = len(text)

    def bad() -> ScannedValue:
        return ScannedValue("".join(parts), None, False)

    while j < n:
        c = text[j]
        if c in _WS:
            j += 1
            continue
        if c in "}]":
            closes = "{" if c == "}" else "["
            if not stack or stack[-1] != closes or want not in (",", "key}" if c == "}" else "value]"):
                return bad()
            stack.pop()
            parts.append(c)
            j += 1
            want = ","
            if not stack:
                return ScannedValue("".join(parts), j)
            continue
        if c == ",":
            if want != ",":
                return bad()
            parts.append(", ")
            want = "key" if stack[-1] == "{" else "value"
            j += 1
            continue
        if c == ":":
            if want != ":":
                return bad()
            parts.append(": ")
            want = "value"
            j += 1
            continue
        if want in ("key", "key}"):
            if c != '"':
                return bad()
            _, canon, end, valid = scan_string(text, j)
            if not valid:
                return bad()
            if end is None:  # a key is held back whole
                return ScannedValue("".join(parts), None)
            parts.append(canon)
            want = ":"
            j = end
            continue
        if want not in ("value", "value]"):
            return bad()
        if c in "{[":
            stack.append(c)
            parts.append(c)
            want = "key}" if c == "{" else "value]"
            j += 1
            continue
        if c == '"':
            _, canon, end, valid = scan_string(text, j)
            if not valid:
                return bad()
            parts.append(canon)
            if end is None:
                return ScannedValue("".join(parts), None)
            j = end
        elif c in _NUMBER_CHARS:
            k = j
            while k < n and text[k] in _NUMBER_CHARS:
                k += 1
            if k == n:  # more digits may come
                return ScannedValue("".join(parts), None)
            try:
                parts.append(json.dumps(json.loads(text[j:k])))
            except ValueError:
                return bad()
            j = k
        else:
            for lit in _LITERALS:
                if text.startswith(lit, j):
                    parts.append(lit)
                    j += len(lit)
                    break
                if lit.startswith(text[j:]):  # the text ends inside the literal
                    return ScannedValue("".join(parts), None)
            else:
                return bad()
        if not stack:
            return ScannedValue("".join(parts), j)
        want = ","
    return ScannedValue("".join(parts), None)
