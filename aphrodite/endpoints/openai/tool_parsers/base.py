"""What every tool-call parser shares: the parse result, the parser interface, and the one streaming
driver that turns successive parses of the growing text into OpenAI's ``delta.tool_calls`` pieces.

A parser has one job: read the model's text so far (``final`` once generation ended) and say what is
certain: the plain content before the calls, and each call's name and the canonical prefix of its
arguments. Every later parse extends the earlier ones, so streaming is a diff of two parses and the
whole answer is the last parse; the two cannot disagree.
"""
from __future__ import annotations

import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from aphrodite.endpoints.openai.tool_parsers.json_scan import scan_string, scan_value, skip_ws

__all__ = ["ParsedToolCalls", "PartialCall", "ToolCallStream", "ToolParser", "add_call", "held_back",
           "make_tool_call_id", "scan_call_list", "scan_call_object"]


def make_tool_call_id() -> str:
    """vLLM's tool call id: ``chatcmpl-tool-`` and a random hex uuid."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def mistral_tool_call_id() -> str:
    """Mistral's templates accept only 9 alphanumeric characters as a tool call id."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


@dataclass
class PartialCall:
    """One tool call as far as it is known: ``name`` once complete, ``arguments`` a canonical prefix
    of the final arguments text (all of it once ``done``)."""

    name: str | None
    arguments: str = ""
    done: bool = False


@dataclass
class ParsedToolCalls:
    """The certain content (text that is not a tool call) and the calls found in it."""

    content: str
    calls: list[PartialCall] = field(default_factory=list)


def held_back(text: str, *markers: str) -> int:
    """How many trailing characters of ``text`` could be the start of one of ``markers``: while
    streaming, those are not yet content."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


def scan_call_object(text: str, i: int, name_key: str = "name",
                     args_keys: tuple[str, ...] = ("arguments", "parameters")) -> tuple[PartialCall | None, int | None]:
    """The ``{"name": ..., "arguments": {...}}`` object at ``text[i]``: the call as far as known (None
    while even its name is not, or when the text is not such an object) and the index past its ``}``."""
    n = len(text)
    j = skip_ws(text, i)
    if j >= n or text[j] != "{":
        return None, None
    call = PartialCall(None)
    has_args = False
    j += 1
    while True:
        j = skip_ws(text, j)
        if j >= n:
            return call, None
        if text[j] == "}":
            break
        if text[j] != '"':
            return None, None
        key, _, end, valid = scan_string(text, j)
        if not valid:
            return None, None
        if end is None:
            return call, None
        j = skip_ws(text, end)
        if j >= n:
            return call, None
        if text[j] != ":":
            return None, None
        j = skip_ws(text, j + 1)
        if j >= n:
            return call, None
        if key == name_key:
            if text[j] != '"':
                return None, None
            name, _, end, valid = scan_string(text, j)
            if not valid:
                return None, None
            if end is None:
                return call, None
            call.name = name
            j = end
        else:
            value = scan_value(text, j)
            if not value.valid:
                return None, None
            if key in args_keys and not has_args:
                has_args = True
                call.arguments = value.canonical
            if value.end is None:
                return call, None
            j = value.end
        j = skip_ws(text, j)
        if j >= n:
            return call, None
        if text[j] == ",":
            j += 1
        elif text[j] != "}":
            return None, None
    if call.name is None:
        return None, None
    if not has_args:
        call.arguments = "{}"
    call.done = True
    return call, j + 1


def add_call(parsed: ParsedToolCalls, text: str, j: int,
             args_keys: tuple[str, ...] = ("arguments", "parameters")) -> int | None:
    """Scan the call object at ``text[j]`` into ``parsed`` (an unreadable one as ``PartialCall(None)``);
    the index past it and the blanks after it, or None when the text ends inside it or it is not a call."""
    call, stop = scan_call_object(text, j, args_keys=args_keys)
    parsed.calls.append(call if call is not None else PartialCall(None))
    return None if call is None or stop is None else skip_ws(text, stop)


def scan_call_list(text: str, j: int, parsed: ParsedToolCalls, args_keys: tuple[str, ...] = ("arguments", "parameters"),
                   ) -> None:
    """The call objects of a JSON list whose ``[`` ends before ``text[j]``, appended to ``parsed``; the
    last call stays not ``done`` until the list is closed."""
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return
        end = add_call(parsed, text, j, args_keys)
        if end is None:
            return
        j = end
        if j >= len(text) or text[j] not in ",]":
            parsed.calls[-1].done = False  # not closed yet, or something else follows
            return
        if text[j] == "]":
            if skip_ws(text, j + 1) != len(text):
                parsed.calls[-1].done = False
            return
        j += 1


class ToolParser:
    """Reads tool calls out of a model's text. Subclasses set ``markers`` (text that may start a call,
    held back from streamed content) and implement ``parse``."""

    name: str = ""
    markers: tuple[str, ...] = ()
    # Parsers whose call marker is a special token need it kept in the text (vLLM's adjust_request).
    keep_special_tokens: bool = False

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        """What ``text`` says for sure; ``final`` once no more text will come."""
        raise NotImplementedError

    def new_id(self) -> str:
        return make_tool_call_id()

    def no_calls(self, text: str, final: bool) -> ParsedToolCalls:
        """Text without a call marker: all content, less (while streaming) a tail that may start one."""
        return ParsedToolCalls(text if final else text[:len(text) - held_back(text, *self.markers)])

    def extract_tool_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The whole answer: (content or None, OpenAI tool calls); no calls when none parse completely."""
        parsed = self.parse(text, final=True)
        calls = [c for c in parsed.calls if c.done and c.name]
        if not calls or len(calls) != len(parsed.calls):
            return text, []
        return parsed.content or None, [tool_call(self.new_id(), c.name, c.arguments) for c in calls]


def tool_call(call_id: str, name: str | None, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class ToolCallStream:
    """One choice's streaming state: feed it the growing text, get the delta pieces not sent yet.

    ``max_calls`` (1 when ``parallel_tool_calls`` is false) drops the calls past it, as vLLM does.
    """

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.content_sent = 0
        self.sent: list[tuple[str, int]] = []  # per call started: (id, argument characters sent)
        self.content_text = ""

    @property
    def called(self) -> bool:
        return bool(self.sent)

    def step(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new ``delta.tool_calls`` entries) for the text so far."""
        parsed = self.parser.parse(text, final)
        if final and parsed.calls and not all(c.done and c.name for c in parsed.calls) and not self.sent:
            parsed = ParsedToolCalls(text)  # not tool calls after all: the held-back text is content
        content = ""
        if len(parsed.content) > self.content_sent and parsed.content.startswith(self.content_text):
            content = parsed.content[self.content_sent:]
            self.content_sent = len(parsed.content)
            self.content_text = parsed.content
        deltas: list[dict[str, Any]] = []
        calls = parsed.calls if self.max_calls is None else parsed.calls[:self.max_calls]
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self.sent):
                call_id = self.parser.new_id()
                self.sent.append((call_id, 0))
                deltas.append({"index": index, "id": call_id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            if index >= len(self.sent):
                break
            call_id, n_sent = self.sent[index]
            if len(call.arguments) > n_sent:
                piece = call.arguments[n_sent:]
                self.sent[index] = (call_id, len(call.arguments))
                if deltas and deltas[-1]["index"] == index:
                    deltas[-1]["function"]["arguments"] += piece
                else:
                    deltas.append({"index": index, "function": {"arguments": piece}})
        return content, deltas
