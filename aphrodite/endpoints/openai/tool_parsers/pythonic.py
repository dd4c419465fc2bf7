"""``pythonic``: calls written as a Python list, ``[get_weather(city="Paris"), get_time()]`` (Llama 3.2,
ToolACE, ...). Arguments are keyword arguments with literal values, turned into a JSON object."""
from __future__ import annotations

import ast
import json
from typing import Any

from aphrodite.endpoints.openai.tool_parsers.base import ParsedToolCalls, PartialCall, ToolParser


def _literal(source: str) -> tuple[str, Any] | None:
    """``key=value`` as (key, value), or None when it is not one keyword argument with a literal value."""
    try:
        tree = ast.parse(f"f({source})", mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not isinstance(call, ast.Call) or call.args or len(call.keywords) != 1 or call.keywords[0].arg is None:
        return None
    try:
        value = ast.literal_eval(call.keywords[0].value)
        json.dumps(value)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    return call.keywords[0].arg, value


class _Scanner:
    """Walks Python source outside string literals, tracking bracket depth."""

    def __init__(self, text: str) -> None:
        self.text = text

    def next_top_level(self, i: int, depth0: int, stops: str) -> tuple[int, int]:
        """The index of the first character in ``stops`` at bracket depth ``depth0`` (or len(text)),
        and the depth reached; strings are skipped whole (an unfinished one runs to the end)."""
        text, n, depth = self.text, len(self.text), depth0
        while i < n:
            c = text[i]
            if c in "\"'":
                quote = c * 3 if text.startswith(c * 3, i) else c
                i += len(quote)
                while i < n and not text.startswith(quote, i):
                    i += 2 if text[i] == "\\" else 1
                i += len(quote)
                continue
            if depth == depth0 and c in stops:
                return i, depth
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth < depth0:
                    return i, depth
            i += 1
        return n, depth


class PythonicToolParser(ToolParser):
    """The whole answer must be the list (vLLM's rule): then the content is None; otherwise it is content."""

    name = "pythonic"
    markers = ("[",)

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        body = text.lstrip()
        if not body:
            return ParsedToolCalls(text if final else "")
        if body[0] != "[":
            return ParsedToolCalls(text)
        if final and not self._is_call_list(body):
            return ParsedToolCalls(text, [PartialCall(None)])
        parsed = ParsedToolCalls("")
        scan = _Scanner(body)
        i, n = 1, len(body)
        while True:
            while i < n and body[i] in " \t\r\n,":
                i += 1
            if i >= n or body[i] == "]":
                return parsed
            paren = body.find("(", i)
            if paren < 0:
                return parsed
            name = body[i:paren].strip()
            if not name.isidentifier():
                parsed.calls.append(PartialCall(None))
                return parsed
            call = PartialCall(name, "{")
            parsed.calls.append(call)
            items: list[str] = []
            j = paren + 1
            while True:
                stop, depth = scan.next_top_level(j, 0, ",)")
                segment = body[j:stop].strip()
                if stop >= n:  # the argument is unfinished
                    return parsed
                if segment:
                    kv = _literal(segment)
                    if kv is None:
                        parsed.calls[-1] = PartialCall(None)
                        return parsed
                    items.append(f"{json.dumps(kv[0], ensure_ascii=False)}: {json.dumps(kv[1], ensure_ascii=False)}")
                    call.arguments = "{" + ", ".join(items)
                j = stop + 1
                if body[stop] == ")":
                    call.arguments += "}"
                    call.done = True
                    break
            i = j

    @staticmethod
    def _is_call_list(body: str) -> bool:
        try:
            tree = ast.parse(body.strip(), mode="eval")
        except SyntaxError:
            return False
        calls = tree.body.elts if isinstance(tree.body, ast.List) else None
        return bool(calls) and all(
            isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args for c in calls)
