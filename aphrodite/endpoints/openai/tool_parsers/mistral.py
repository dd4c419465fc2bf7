"""``mistral``: ``[TOOL_CALLS]`` and a JSON list of ``{"name", "arguments"}`` objects (v3 tokenizers), or
``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+ tokenizers)."""
from __future__ import annotations

from aphrodite.endpoints.openai.tool_parsers.base import (
    ParsedToolCalls,
    PartialCall,
    ToolParser,
    mistral_tool_call_id,
    scan_call_list,
)
from aphrodite.endpoints.openai.tool_parsers.json_scan import scan_value, skip_ws


class MistralToolParser(ToolParser):
    """Content is the text before ``[TOOL_CALLS]`` (a special token, so it is kept in the text while tools
    are on); ids are 9 alphanumeric characters, the only ones Mistral's templates accept."""

    name = "mistral"
    bot_token = "[TOOL_CALLS]"
    args_token = "[ARGS]"
    markers = (bot_token,)
    keep_special_tokens = True

    def new_id(self) -> str:
        return mistral_tool_call_id()

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        first = text.find(self.bot_token)
        if first < 0:
            return self.no_calls(text, final)
        parsed = ParsedToolCalls(text[:first])
        j = skip_ws(text, first + len(self.bot_token))
        if j < len(text) and text[j] == "[":
            scan_call_list(text, j + 1, parsed)
        else:
            self._parse_named(text, first, parsed, final)
        return parsed

    def _parse_named(self, text: str, pos: int, parsed: ParsedToolCalls, final: bool) -> None:
        while pos >= 0:
            start = pos + len(self.bot_token)
            args_at = text.find(self.args_token, start)
            if args_at < 0:
                if final:  # a name without arguments: not a call
                    parsed.calls.append(PartialCall(None))
                return
            call = PartialCall(text[start:args_at].strip())
            parsed.calls.append(call)
            value = scan_value(text, args_at + len(self.args_token))
            if not value.valid:
                call.done = False
                parsed.calls.append(PartialCall(None))
                return
            call.arguments = value.canonical
            if value.end is None:
                return
            call.done = True
            pos = text.find(self.bot_token, value.end)
