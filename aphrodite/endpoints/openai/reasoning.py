"""Reasoning parsers for ``--reasoning-parser NAME`` (vLLM's names): split ``<think>...</think>`` off the
answer into ``reasoning_content``.

Like the tool-call parsers, a reasoning parser reads the text so far and says what is certain (a tag
cut in half at the end is held back), so streaming is a diff of successive parses. It works on the
text, not on token ids, so a tokenizer without ``<think>`` as one token (a fine-tune's, a GGUF's) works too.
"""
from __future__ import annotations

import json
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

    def ended_in(self, prompt: str) -> bool:
        """Whether the prompt leaves no thinking to do: the request turned it off, or the template closed
        the think block itself (Qwen 3's ``enable_thinking=false`` ends the prompt with ``</think>``)."""
        return not self.thinking or prompt.rstrip().endswith(self.end_token)

    def grammar_prefix(self) -> str:
        """xgrammar EBNF for reasoning text up to its first end token and the blanks after it: what comes
        before a constrained answer, as vLLM constrains structured output only once reasoning ended.

        Written without look-ahead: a run of the end token's first character followed by a proper prefix of
        the rest is reasoning as long as it does not go on to the whole end token."""
        first, rest = self.end_token[0], self.end_token[1:]
        assert first not in rest, "the end token's first character must not recur in it"

        def lit(s: str) -> str:
            return json.dumps(s)

        def other(*chars: str) -> str:
            return "[^" + "".join("\\" + c if c in "]^-\\" else c for c in chars) + "]"

        partial = " | ".join(lit(rest[:k]) for k in range(1, len(rest)))
        finish = " | ".join([other(rest[0], first)] + [f"({lit(rest[:k])} {other(rest[k], first)})"
                                                     for k in range(1, len(rest))])
        runs = f"{lit(first)}+ (reasoning_partial {lit(first)}+)*"
        return (f"root ::= reasoning_chunk* {runs} {lit(rest)} [ \\t\\n\\r]*\n"
                f"reasoning_chunk ::= {other(first)} | ({runs} reasoning_finish)\n"
                f"reasoning_partial ::= {partial}\n"
                f"reasoning_finish ::= {finish}\n")

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
