"""Tool calling and reasoning in chat completions, as vLLM serves them.

``tool_choice`` decides how calls come out: ``"none"`` (plain text), ``"auto"`` (the model decides;
``--tool-call-parser`` reads its calls out of the text), ``"required"`` or a named function (the output
is constrained to a JSON schema of the call(s), so it is always a call). ``--reasoning-parser`` splits
``<think>...</think>`` off first; a constrained answer then comes after the thinking, as vLLM constrains
structured output only once reasoning ended. ``ToolPlan`` holds one request's decisions; ``ChoiceOutput``
turns one choice's text into a message, or into stream deltas.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aphrodite.endpoints.openai.errors import OpenAIError, from_value_error
from aphrodite.endpoints.openai.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser
from aphrodite.endpoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ToolCallStream,
    ToolParser,
    get_tool_parser,
)
from aphrodite.endpoints.openai.tool_parsers.base import (
    ParsedToolCalls,
    PartialCall,
    scan_call_list,
)
from aphrodite.endpoints.openai.tool_parsers.json_scan import skip_ws
from aphrodite.sampling_params import StructuredOutputsParams

__all__ = ["ChoiceOutput", "ToolPlan", "add_tool_args", "tool_options"]


def add_tool_args(add: Callable[..., None]) -> None:
    """The server's tool and reasoning flags (vLLM's names), through ``add_server_args``' ``add``."""
    add("--enable-auto-tool-choice", action="store_true", default=False,
        help='Let the model call tools on its own (tool_choice "auto", the default when a request has tools): '
             "needs --tool-call-parser. Without it such requests get a 400.")
    add("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS), metavar="NAME",
        help="How to read tool calls out of the model's text for tool_choice auto: "
             f"{', '.join(sorted(TOOL_PARSERS))}. (default: none)")
    add("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS), metavar="NAME",
        help="Split the model's <think>...</think> into reasoning_content: "
             f"{', '.join(sorted(REASONING_PARSERS))}. (default: none)")


def tool_options(args: Any, opt: Callable[[Any, str], Any]) -> dict[str, Any]:
    """``ChatServing``'s keyword arguments from the parsed flags (``opt`` reads one, with its default)."""
    return {"enable_auto_tools": bool(opt(args, "enable_auto_tool_choice")),
            "tool_parser": opt(args, "tool_call_parser"), "reasoning_parser": opt(args, "reasoning_parser")}


class RequiredToolParser(ToolParser):
    """``tool_choice="required"``: the constrained output is a JSON list of ``{"name", "parameters"}``."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        parsed = ParsedToolCalls("")
        j = skip_ws(text, 0)
        if j < len(text):
            if text[j] != "[":
                return ParsedToolCalls("", [PartialCall(None)])
            scan_call_list(text, j + 1, parsed, args_keys=("parameters",))
        return parsed


class NamedToolParser(ToolParser):
    """A named ``tool_choice``: the constrained output is the function's arguments, sent as they come."""

    name = "named"

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def parse(self, text: str, final: bool) -> ParsedToolCalls:
        return ParsedToolCalls("", [PartialCall(self.function, text.lstrip(), final)])


@dataclass
class ToolPlan:
    """One request's tool and reasoning decisions: ``mode`` is none, auto, required or named."""

    mode: str = "none"
    function: str | None = None
    tool_parser: str | None = None
    reasoning_parser: str | None = None
    include_reasoning: bool = True
    max_calls: int | None = None
    tokenizer: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    schema: dict[str, Any] | None = None
    thinking: bool = False  # a reasoning parser is on and the prompt leaves thinking to the model (see_prompt)

    @classmethod
    def for_request(cls, request: Any, *, enable_auto_tools: bool, tool_parser: str | None,
                    reasoning_parser: str | None, tokenizer: Any = None) -> ToolPlan:
        """Check ``tools``/``tool_choice`` as vLLM does (400s with its messages) and decide."""
        tools = request.tools
        choice = request.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        plan = cls(reasoning_parser=reasoning_parser, include_reasoning=request.include_reasoning,
                   tokenizer=tokenizer, chat_template_kwargs=request.chat_template_kwargs,
                   max_calls=None if request.parallel_tool_calls is not False else 1)
        if choice == "none":
            return plan
        if tools is None:
            raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if choice == "required" and not tools:
            return plan
        if isinstance(choice, str):
            plan.mode = choice
        else:
            name = choice.function.name
            if name not in {t.function.name for t in tools}:
                raise OpenAIError("The tool specified in `tool_choice` does not match any of the specified `tools`",
                                  param="tool_choice")
            plan.mode, plan.function = "named", name
        if plan.mode == "auto":
            if not (enable_auto_tools and tool_parser):
                raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                  "to be set", param="tool_choice")
            plan.tool_parser = tool_parser
        else:
            plan.schema = json_schema_of_tools(tools, plan.function, plan.max_calls)
        return plan

    def see_prompt(self, prompt: str) -> None:
        """Whether the model thinks first: a reasoning parser is on and the prompt did not close thinking."""
        self.thinking = self.reasoning_parser is not None and not self.reasoner().ended_in(prompt)

    def reasoner(self) -> ReasoningParser:
        return get_reasoning_parser(self.reasoning_parser or "", self.tokenizer, self.chat_template_kwargs)

    def structured_outputs(self, request: Any) -> StructuredOutputsParams | None:
        """The constraint to set, or None to leave the request's as it is: a required or named choice's calls
        (they replace any other, as in vLLM). When the model thinks first (``see_prompt``), a JSON constraint
        (the calls, ``response_format``) applies only after the thinking, as vLLM applies structured output
        once reasoning ended; choice, regex and grammar constraints still apply from the first token."""
        if self.schema is not None:
            so: StructuredOutputsParams | None = StructuredOutputsParams(json=self.schema)
        elif self.thinking:
            try:
                so = request.structured_outputs_params()
            except ValueError as e:
                raise from_value_error(e, set(type(request).model_fields)) from None
        else:
            return None
        if so is None or not self.thinking or so.kind not in ("json", "json_object"):
            return so
        import xgrammar as xgr
        schema = so.json if so.kind == "json" else {"type": "object"}
        try:
            answer = xgr.Grammar.from_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                  any_whitespace=not so.disable_any_whitespace)
        except Exception as e:  # xgrammar's own message says what in the schema it cannot take
            raise OpenAIError(f"Invalid structured output json: {e}") from None
        prefix = xgr.Grammar.from_ebnf(self.reasoner().grammar_prefix())
        return StructuredOutputsParams(grammar=str(xgr.Grammar.concat(prefix, answer)))

    @property
    def keep_special_tokens(self) -> bool:
        """Parsers whose call marker is a special token need it in the text (vLLM's ``adjust_request``)."""
        return self.mode == "auto" and get_tool_parser(self.tool_parser or "").keep_special_tokens

    def new_choice(self) -> ChoiceOutput:
        return ChoiceOutput(self)


def json_schema_of_tools(tools: list[Any], function: str | None, max_calls: int | None) -> dict[str, Any]:
    """vLLM's schema: a named function's parameters; for "required", a non-empty list of
    ``{"name": <one of the tools>, "parameters": <its parameters>}`` with every tool's ``$defs`` lifted to
    the top (a name defined twice differently is a 400). ``parallel_tool_calls=false`` allows one call."""
    empty = {"type": "object", "properties": {}}
    if function is not None:
        tool = next(t for t in tools if t.function.name == function)
        return tool.function.parameters or empty
    defs: dict[str, Any] = {}
    variants = []
    for tool in tools:
        params = copy.deepcopy(tool.function.parameters) if tool.function.parameters else empty
        for name, schema in params.pop("$defs", {}).items():
            if name in defs and defs[name] != schema:
                raise OpenAIError(f"Tool definition '{name}' has multiple schemas, which is not supported.",
                                  param="tools")
            defs[name] = schema
        variants.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                        "parameters": params}, "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    if defs:
        schema["$defs"] = defs
    return schema


class ChoiceOutput:
    """One choice's text read as reasoning, content and tool calls: whole (``message``) or as deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.reasoner: ReasoningParser | None = plan.reasoner() if plan.thinking else None
        self.parser: ToolParser | None = None
        if plan.mode == "auto":
            self.parser = get_tool_parser(plan.tool_parser or "", plan.tokenizer)
        elif plan.mode == "required":
            self.parser = RequiredToolParser()
        elif plan.mode == "named":
            self.parser = NamedToolParser(plan.function or "")
        self.stream = ToolCallStream(self.parser, plan.max_calls) if self.parser is not None else None
        self.reasoning_sent = 0
        self.content_sent = 0
        self.called = False

    # ---- whole answers ---------------------------------------------------------------------------------
    def message(self, role: str, text: str) -> dict[str, Any]:
        """The response ``message`` for the choice's whole text."""
        reasoning, content = self.reasoner.extract(text) if self.reasoner else (None, text)
        calls: list[dict[str, Any]] = []
        if self.parser is not None and content is not None:
            rest, calls = self.parser.extract_tool_calls(content)
            if calls:
                content = rest if self.plan.mode == "auto" else ""
        if self.plan.max_calls is not None:
            calls = calls[:self.plan.max_calls]
        self.called = bool(calls)
        message: dict[str, Any] = {"role": role, "content": content, "tool_calls": calls}
        if self.reasoner is not None and self.plan.include_reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        return message

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's rule, as vLLM applies it: "tool_calls" when an auto or required choice called a tool and
        ended normally; a named function's call ends with the engine's reason ("stop"), and a call cut off
        by ``max_tokens`` keeps "length" (vLLM streams it so too)."""
        if self.called and reason == "stop" and self.plan.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    # ---- streaming -------------------------------------------------------------------------------------
    @property
    def plain(self) -> bool:
        """No reasoning and no tool calls to read: the text streams as it comes."""
        return self.reasoner is None and self.parser is None

    def deltas(self, text: str, final: bool) -> list[dict[str, Any]]:
        """The ``delta``s for the text so far (``final`` once the choice ended): only what is new, with at
        most one ``tool_calls`` entry each, as OpenAI streams them (vLLM's clients and tests read
        ``tool_calls[0]`` only)."""
        delta = self._delta(text, final)
        calls = delta.get("tool_calls", ())
        if len(calls) <= 1:
            return [delta] if delta else []
        return [{**delta, "tool_calls": calls[:1]}] + [{"tool_calls": [call]} for call in calls[1:]]

    def _delta(self, text: str, final: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        content_text = text
        if self.reasoner is not None:
            reasoning, content_text = self.reasoner.parse(text, final)
            if len(reasoning) > self.reasoning_sent:
                if self.plan.include_reasoning:
                    delta["reasoning_content"] = delta["reasoning"] = reasoning[self.reasoning_sent:]
                self.reasoning_sent = len(reasoning)
        if self.stream is not None:
            content, calls = self.stream.step(content_text, final)
            self.called = self.stream.called
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
        elif len(content_text) > self.content_sent:
            delta["content"] = content_text[self.content_sent:]
            self.content_sent = len(content_text)
        return delta
