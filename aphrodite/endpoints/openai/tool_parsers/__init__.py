"""Tool-call parsers for ``--tool-call-parser NAME`` (vLLM's names), and the registry that finds them.

Add one by subclassing ``ToolParser`` (``parse(text, final)``) and calling ``register_tool_parser``.
"""
from __future__ import annotations

from typing import Any

from aphrodite.endpoints.openai.tool_parsers.base import (
    ParsedToolCalls,
    PartialCall,
    ToolCallStream,
    ToolParser,
    make_tool_call_id,
)
from aphrodite.endpoints.openai.tool_parsers.hermes import HermesToolParser
from aphrodite.endpoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from aphrodite.endpoints.openai.tool_parsers.mistral import MistralToolParser
from aphrodite.endpoints.openai.tool_parsers.pythonic import PythonicToolParser

__all__ = ["TOOL_PARSERS", "ParsedToolCalls", "PartialCall", "ToolCallStream", "ToolParser", "get_tool_parser",
           "make_tool_call_id", "register_tool_parser"]

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser], *names: str) -> type[ToolParser]:
    """Make ``cls`` available to ``--tool-call-parser`` under its ``name`` and any ``names``."""
    for name in (cls.name, *names):
        TOOL_PARSERS[name] = cls
    return cls


def get_tool_parser(name: str, tokenizer: Any = None) -> ToolParser:
    """A new parser (parsers are per choice: streaming keeps state in its driver, not here)."""
    try:
        cls = TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"Unknown tool call parser {name!r}; choose from {', '.join(sorted(TOOL_PARSERS))}.") from None
    return cls(tokenizer)


register_tool_parser(HermesToolParser)
register_tool_parser(Llama3JsonToolParser, "llama4_json")
register_tool_parser(MistralToolParser)
register_tool_parser(PythonicToolParser)
