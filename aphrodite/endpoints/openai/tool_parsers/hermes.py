"""``hermes``: Hermes 2 Pro / Qwen 2.5 / Qwen 3 calls, one JSON object per ``<tool_call>...</tool_call>``."""
from __future__ import annotations

from aphrodite.endpoints.openai.tool_parsers.base import ParsedToolCalls, ToolParser, add_call


class HermesToolParser(ToolParser):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, any number of times. The
    content is the text before the first call (vLLM's rule); the last ``</tool_call>`` may be missing."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    markers = (start,)
    keep_special_tokens = True  # <tool_call> is a special token in some vocabularies (vLLM keeps them too)

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        first = text.find(self.start)
        if first < 0:
            return self.no_calls(text, final)
        parsed = ParsedToolCalls(text[:first])
        pos = first
        while pos >= 0:
            j = add_call(parsed, text, pos + len(self.start))
            if j is None:
                return parsed
            if text.startswith(self.end, j):
                j += len(self.end)
            elif not self.end.startswith(text[j:]) and not text.startswith(self.start, j):
                parsed.calls[-1].done = False  # something else follows the object: not a well-formed call
                return parsed
            pos = text.find(self.start, j)
        return parsed
