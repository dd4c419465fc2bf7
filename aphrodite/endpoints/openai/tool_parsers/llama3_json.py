"""``llama3_json``: Llama 3.1/3.2/4 JSON calls, ``{"name": ..., "parameters": {...}}``, several joined by
``;``, optionally after ``<|python_tag|>``."""
from __future__ import annotations

from aphrodite.endpoints.openai.tool_parsers.base import ParsedToolCalls, ToolParser, add_call
from aphrodite.endpoints.openai.tool_parsers.json_scan import skip_ws


class Llama3JsonToolParser(ToolParser):
    """Tool calls when the answer starts (after ``<|python_tag|>`` and blanks) with ``{``; then the answer
    holds only calls, and the content is None. Anything else is plain content."""

    name = "llama3_json"
    bot_token = "<|python_tag|>"
    markers = (bot_token, "{")

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        if not final and self.bot_token.startswith(text):  # nothing yet, or a part of <|python_tag|>
            return ParsedToolCalls("")
        i = len(self.bot_token) if text.startswith(self.bot_token) else 0
        j = skip_ws(text, i)
        if j == len(text):  # only blanks so far: a call may still follow
            return ParsedToolCalls(text if final else "")
        if text[j] != "{":
            return ParsedToolCalls(text)
        parsed = ParsedToolCalls("")
        while True:
            end = add_call(parsed, text, j)
            if end is None or end == len(text):
                return parsed
            j = end
            if text[j] != ";":
                parsed.calls[-1].done = False
                return parsed
            j = skip_ws(text, j + 1)
            if j == len(text):
                return parsed
