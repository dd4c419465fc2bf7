"""Reasoning parsers for ``--reasoning-parser NAME`` (vLLM's names): split ``<think>...</think>`` off the
answer into ``reasoning_content``.

Like the tool-call parsers, a reasoning parser reads the text so far and says what is certain (a tag
cut in half at the end is held back), so streaming is a diff of successive parses. It works on the
text, not on token ids, so a tokenizer without ``<think>`` as one token (a fine-tune's, a GGUF's) works too.
"""
from __future__ import annotations

from typing import Any

from aphrodite.endpoints.openai.tool_parsers.base import held_back

__all__ = ["REASONING_PARSERS", "ReasoningParser", "get_reasoning_parser", "register_reasoning_parser"]


class ReasoningParser:
    """``<think>`` is optional in the output (templates often put it in the prompt): everything before
    ``</think>`` is reasoning, everything after it content; without ``</think>`` all is reasoning."""

    name = "deepseek_r1"
    start_token = "<think>"
    end_token = "</think>"

    def __init__(self, tokenizer: Any = None, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs or {}

    @property
    def thinking(self) -> bool:
        """False when the request turned thinking off: then the output is all content."""
        return True

    def parse(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) certain so far."""
        if not self.thinking:
            return "", text
        before, started, after = text.partition(self.start_token)
        if started:  # the tag goes; text before it (rarely any) stays reasoning, as vLLM streams it
            text = before + after
        reasoning, ended, content = text.partition(self.end_token)
        if ended:
            return reasoning, content
        if not final:
            markers = (self.end_token,) if started else (self.start_token, self.end_token)
            reasoning = reasoning[:len(reasoning) - held_back(reasoning, *markers)]
        return reasoning, ""

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """The whole answer: (reasoning or None, content or None), as vLLM returns them."""
        if not self.thinking:
            return None, text
        reasoning, content = self.parse(text, final=True)
        if self.end_token not in text:
            return reasoning, None
        return reasoning, content or None


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen 3: as DeepSeek R1, except that ``chat_template_kwargs={"enable_thinking": false}`` (which makes
    the template close the think block in the prompt) leaves the whole output as content."""

    name = "qwen3"

    @property
    def thinking(self) -> bool:
        return self.chat_template_kwargs.get("enable_thinking", True) is not False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {}


def register_reasoning_parser(cls: type[ReasoningParser], *names: str) -> type[ReasoningParser]:
    for name in (cls.name, *names):
        REASONING_PARSERS[name] = cls
    return cls


def get_reasoning_parser(name: str, tokenizer: Any = None,
                         chat_template_kwargs: dict[str, Any] | None = None) -> ReasoningParser:
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"Unknown reasoning parser {name!r}; choose from "
                         f"{', '.join(sorted(REASONING_PARSERS))}.") from None
    return cls(tokenizer, chat_template_kwargs)


register_reasoning_parser(ReasoningParser)
register_reasoning_parser(Qwen3ReasoningParser)
