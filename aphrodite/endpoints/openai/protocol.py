"""Request and response bodies of the OpenAI API, with vLLM/Aphrodite's extra sampling fields.

Pydantic checks shape and types, strictly as OpenAI does (a bool is not an integer, "5" is not a
number, NaN and Infinity are not numbers). Limits on values (temperature >= 0, top_p <= 1, ...)
are checked once, by ``SamplingParams``, whose ``ValueError`` the handlers turn into a 400; the
fields only state them for the OpenAPI schema (``_limits``). Unknown fields are accepted and
ignored, as OpenAI clients add new ones over time.
"""
from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic.json_schema import SkipJsonSchema

from aphrodite.sampling_params import SamplingParams, StructuredOutputsParams
from aphrodite.tokenization.chat_template import ALLOWED_ROLES, RESERVED_TEMPLATE_KWARGS, TEXT_PART_TYPES


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


class OpenAIRequestModel(OpenAIBaseModel):
    """A request body: strict JSON types (no bool for an int, no string for a number) and finite numbers."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


def _limits(default: Any, **schema: Any) -> Any:
    """A field whose value limits ``SamplingParams`` (or the handler) checks; the OpenAPI schema states them.

    Validating them here too would make two sources of truth that drift apart.
    """
    return Field(default, json_schema_extra=schema)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema has it: 3 or 3.0, never true or "3".
Int = Annotated[int, BeforeValidator(_integral)]
# JSON object keys are strings: a token id key ("50256") is read as an int, the one lax conversion.
TokenIdKey = Annotated[int, Strict(False)]


def _json_string_list(value: Any) -> Any:
    """A list of strings sent as its JSON text (SillyTavern sends ``dry_sequence_breakers`` so), decoded as
    Aphrodite decodes it; text that is not such JSON is an error, not a list of one string."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise ValueError(f"not a list of strings nor its JSON text ({e})") from None
    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
        raise ValueError("a JSON string must hold a list of strings")
    return parsed


# A list of strings, or (as SillyTavern sends it) the JSON text of one; the schema shows the list.
StringListOrJSON = Annotated[list[str], BeforeValidator(_json_string_list)]


# ---- errors -------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- models -------------------------------------------------------------------
class ModelPermission(OpenAIBaseModel):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pygmalionai"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---- shared pieces -------------------------------------------------------------
class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIRequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


# SamplingParams fields a request may set directly, under the same name.
_PASS_THROUGH = ("n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
                 "min_tokens", "skip_special_tokens", "spaces_between_special_tokens", "logit_bias",
                 "prompt_logprobs")


# ---- Aphrodite's samplers and structured output (i16: every extra body field, one block) -------------------
# Extra sampling fields under SamplingParams' own names (docs/sampling.md lists them all).
_SAMPLER_FIELDS = ("no_repeat_ngram_size", "dynatemp_min", "dynatemp_max", "dynatemp_exponent", "temperature_last",
                   "top_a", "tfs", "eta_cutoff", "epsilon_cutoff", "typical_p", "smoothing_factor", "smoothing_curve",
                   "xtc_threshold", "xtc_probability", "nsigma", "skew", "mirostat_mode", "mirostat_tau",
                   "mirostat_eta", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers",
                   "dry_sequence_breaker_ids", "dry_range", "dry_max_ngram", "dry_max_occurrences",
                   "dry_early_exit_match_len", "sampler_priority", "allowed_token_ids", "bad_words",
                   "custom_token_bans")


class JsonSchemaFormat(OpenAIRequestModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIRequestModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class AphroditeSamplingFields(OpenAIRequestModel):
    """Aphrodite's extra samplers and the structured-output fields clients send (OpenAI's
    ``response_format``, vLLM's ``structured_outputs``, Aphrodite 0.6's ``guided_*``)."""

    no_repeat_ngram_size: Int | None = None
    dynatemp_min: float | None = None
    dynatemp_max: float | None = None
    dynatemp_exponent: float | None = None
    temperature_last: bool | None = None
    top_a: float | None = None
    tfs: float | None = None
    eta_cutoff: float | None = None
    epsilon_cutoff: float | None = None
    typical_p: float | None = None
    smoothing_factor: float | None = None
    smoothing_curve: float | None = None
    xtc_threshold: float | None = None
    xtc_probability: float | None = None
    nsigma: float | None = None
    skew: float | None = None
    mirostat_mode: Int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: Int | None = None
    dry_sequence_breakers: StringListOrJSON | None = Field(
        None, description="Strings that break DRY's sequence matching; also accepted as the JSON text of the list.")
    dry_sequence_breaker_ids: list[Int] | None = None
    # llama.cpp's and SillyTavern's name for it is accepted too, as Aphrodite does.
    dry_range: Int | None = Field(None, validation_alias=AliasChoices("dry_range", "dry_penalty_last_n"))
    dry_max_ngram: Int | None = None
    dry_max_occurrences: Int | None = None
    dry_early_exit_match_len: Int | None = None
    sampler_priority: list[Int | str] | None = Field(
        None, validation_alias=AliasChoices("sampler_priority", "sampler_order"))
    allowed_token_ids: list[Int] | None = None
    bad_words: list[str] | None = None
    custom_token_bans: list[Int] | None = None  # Aphrodite's: token ids never sampled
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None

    def sampler_kwargs(self) -> dict[str, Any]:
        """The extra fields the request set, as ``SamplingParams`` keyword arguments; raises ``ValueError``."""
        kwargs: dict[str, Any] = {k: v for k in _SAMPLER_FIELDS if (v := getattr(self, k)) is not None}
        so = self.structured_outputs_params()
        if so is not None:
            kwargs["structured_outputs"] = so
        return kwargs

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one constraint the request asks for, from whichever field it used."""
        found: list[tuple[str, StructuredOutputsParams]] = []
        if self.structured_outputs is not None:
            try:
                found.append(("structured_outputs", StructuredOutputsParams(**self.structured_outputs)))
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        extra: dict[str, Any] = {}
        if self.guided_whitespace_pattern is not None:
            extra["whitespace_pattern"] = self.guided_whitespace_pattern
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            # Empty means unset, as in Aphrodite: SillyTavern sends guided_json {} and guided_grammar "" always.
            if value := getattr(self, name):
                found.append((name, StructuredOutputsParams(**{key: value}, **extra)))
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format of type json_schema needs json_schema.schema.")
            found.append(("response_format", StructuredOutputsParams(json=rf.json_schema.schema_)))
        if len(found) > 1:
            raise ValueError("Only one structured output constraint may be given, got: "
                             f"{', '.join(name for name, _ in found)}.")
        return found[0][1] if found else None
# ---- end of the samplers and structured output block --------------------------------------------------------


class SamplingFields(AphroditeSamplingFields):
    """Sampling fields shared by completions and chat; ``None`` means the engine's default."""

    n: Int | None = _limits(1, minimum=1)  # maximum: max_num_seqs, set in the served schema
    best_of: Int | None = _limits(None, minimum=1)
    temperature: float | None = _limits(None, minimum=0)
    top_p: float | None = _limits(None, exclusiveMinimum=0, maximum=1)
    top_k: Int | None = _limits(None, minimum=-1)
    min_p: float | None = _limits(None, minimum=0, maximum=1)
    presence_penalty: float | None = _limits(None, minimum=-2, maximum=2)
    frequency_penalty: float | None = _limits(None, minimum=-2, maximum=2)
    repetition_penalty: float | None = _limits(None, exclusiveMinimum=0)
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Int | None = _limits(None, minimum=0)
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[TokenIdKey, float] | None = _limits(None, propertyNames={"pattern": "^-?[0-9]+$"})
    prompt_logprobs: Int | None = _limits(None, minimum=0)  # maximum: max_logprobs
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM: keep only the last k prompt tokens (-1: max_model_len)
    truncate_prompt_tokens: Int | None = _limits(None, minimum=-1)

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None, **overrides: Any) -> SamplingParams:
        """Build (and so validate) the engine's parameters; raises ``ValueError``."""
        kwargs: dict[str, Any] = {k: v for k in _PASS_THROUGH if (v := getattr(self, k)) is not None}
        kwargs.update(self.sampler_kwargs())
        if self.logit_bias:
            # OpenAI's range, clamped as vLLM does: a huge bias would overflow the logits to inf (then NaN).
            kwargs["logit_bias"] = {t: min(100.0, max(-100.0, b)) for t, b in self.logit_bias.items()}
        kwargs.update(overrides)
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk too (vLLM's ``continuous_usage_stats``), not only in the last one."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


# ---- completions ------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = _limits(16, minimum=0)  # 0 only with echo
    echo: bool | None = False
    logprobs: Int | None = _limits(None, minimum=0)  # maximum: max_logprobs
    suffix: str | None = None


class CompletionLogprobs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


# ---- chat ------------------------------------------------------------------------
# What ``apply_chat_template`` accepts (it checks, with messages naming the message at fault).
_ROLES = sorted(ALLOWED_ROLES)
_TEXT_PARTS = {"type": "array", "items": {"anyOf": [{"type": "string"}, {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"enum": sorted(TEXT_PART_TYPES)}, "text": {"type": "string"}}}]}}
_NOT_RESERVED = {"propertyNames": {"not": {"enum": sorted(RESERVED_TEMPLATE_KWARGS)}}}
# Both true is refused; add_generation_prompt defaults to true, so continuing needs it set to false.
_NOT_BOTH_PROMPT_AND_CONTINUE = {"not": {"required": ["continue_final_message"], "properties": {
    "continue_final_message": {"const": True}, "add_generation_prompt": {"not": {"const": False}}}}}


class ChatMessage(OpenAIRequestModel):
    role: str = _limits(..., enum=_ROLES)
    content: str | list[str | dict[str, Any]] | None = _limits(
        None, anyOf=[{"type": "string"}, _TEXT_PARTS, {"type": "null"}])
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(OpenAIRequestModel):
    """vLLM's fields, so that templates see tools as vLLM dumps them (``description: null`` included); others
    a client sends (OpenAI's ``strict``) pass through as they came."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatCompletionTool(OpenAIRequestModel):
    """One entry of ``tools``: a function the model may call, with a JSON Schema of its parameters."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIRequestModel):
    name: str


class NamedToolChoice(OpenAIRequestModel):
    """``tool_choice`` naming the one function to call."""

    type: Literal["function"] = "function"
    function: NamedFunction


_NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _tool_choice(value: Any) -> Any:
    """vLLM's messages for a ``tool_choice`` that is none of its forms (a named function's name is then
    looked up among the tools by the handler)."""
    if value is None or (isinstance(value, str) and value in ("none", "auto", "required")):
        return value
    if not isinstance(value, dict):
        raise ValueError(f'Invalid value for `tool_choice`: {value}! Only named tools, "none", "auto" or "required" '
                         "are supported.")
    function = value.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"Invalid value for `function`: `{function}` in `tool_choice`! {_NAMED_USAGE}")
    if "name" not in function:
        raise ValueError(f"Expected field `name` in `function` in `tool_choice`! {_NAMED_USAGE}")
    if not isinstance(function["name"], str) or not function["name"]:
        raise ValueError(f"Invalid `name` in `function`: `{function['name']}` in `tool_choice`! {_NAMED_USAGE}")
    return value


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=_NOT_BOTH_PROMPT_AND_CONTINUE)

    model: str
    messages: list[ChatMessage] = _limits(..., minItems=1)
    max_tokens: Int | None = _limits(None, minimum=1)
    max_completion_tokens: Int | None = _limits(None, minimum=1)
    logprobs: bool | None = False
    top_logprobs: Int | None = _limits(None, minimum=0)  # maximum: max_logprobs
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # only with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = _limits(None, **_NOT_RESERVED)
    tools: list[ChatCompletionTool] | None = None
    # vLLM's default: "none" without tools, "auto" with them (which needs --enable-auto-tool-choice).
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice | None,
                           BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool | None = True
    include_reasoning: bool = True  # with --reasoning-parser: false leaves reasoning_content out


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(OpenAIBaseModel):
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # With --reasoning-parser: the <think> part (vLLM's current name is reasoning; both are sent).
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None


# ---- tokenize ----------------------------------------------------------------------
class TokenizeRequest(OpenAIRequestModel):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["prompt"], "not": {"required": ["messages"]}},
                  {"required": ["messages"],
                   "allOf": [{"not": {"required": ["prompt"]}}, _NOT_BOTH_PROMPT_AND_CONTINUE]}]})

    model: str | None = None
    prompt: str | SkipJsonSchema[None] = None  # one of these two, never null
    messages: list[ChatMessage] | SkipJsonSchema[None] = _limits(None, minItems=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # only with --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = _limits(None, **_NOT_RESERVED)
    tools: list[ChatCompletionTool] | None = None  # for the chat template, as in chat completions
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        given = [name for name in ("prompt", "messages") if name in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("Give exactly one of prompt or messages.")
        if getattr(self, given[0]) is None:
            raise ValueError(f"{given[0]} must not be null.")
        return self


class TokenizeResponse(OpenAIBaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[Int] = _limits(..., items={"type": "integer", "minimum": 0})  # maximum: the vocabulary


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
