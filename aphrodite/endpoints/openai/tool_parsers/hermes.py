"""``hermes``: Hermes 2 Pro / Qwen 2.5 / Qwen 3 calls, one JSON object per ``<tool_call>...</tool_call>``."""
from __future__ import annotations

from aphrodite.endpoints.openai.tool_parsers.base import ParsedToolCalls, PartialCall, ToolParser, held_back
from aphrodite.endpoints.openai.tool_parsers.base import scan_call_object as _scan
from aphrodite.endpoints.openai.tool_parsers.json_scan import skip_ws


class HermesToolParser(ToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of times. The
    content is the text before the first call (vLLM's rule); the last ``</tool_call>`` may be missing."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    markers = (start,)

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        first = text.find(self.start)
        if first < 0:
            return ParsedToolCalls(text if final else text[:len(text) - held_back(text, *self.markers)])
        parsed = ParsedToolCalls(text[:first])
        pos = first
        while pos >= 0:
            call, stop = _scan(text, pos + len(self.start))
            if call is None:
                parsed.calls.append(PartialCall(None))
                return parsed
            parsed.calls.append(call)
            if stop is None:
                return parsed
            j = skip_ws(text, stop)
            if text.startswith(self.end, j):
                j += len(self.end)
            elif not self.end.startswith(text[j:]) and not text.startswith(self.start, j):
                call.done = False  # something else follows the object: not a well-formed call
                return parsed
            pos = text.find(self.start, j)
        return parsed
