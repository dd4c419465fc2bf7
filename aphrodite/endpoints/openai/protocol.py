"""Request and response bodies of the OpenAI API, with vLLM/Aphrodite's extra sampling fields.

Pydantic checks shape and types only. Limits on values (temperature >= 0, top_p <= 1, ...) are
checked once, by ``SamplingParams``, whose ``ValueError`` the handlers turn into a 400.
Unknown fields are accepted and ignored, as OpenAI clients add new ones over time.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aphrodite.sampling_params import SamplingParams, StructuredOutputsParams


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


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


class StreamOptions(OpenAIBaseModel):
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
                   "dry_early_exit_match_len", "sampler_priority", "allowed_token_ids", "bad_words")


class JsonSchemaFormat(OpenAIBaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class AphroditeSamplingFields(OpenAIBaseModel):
    """Aphrodite's extra samplers and the structured-output fields clients send (OpenAI's
    ``response_format``, vLLM's ``structured_outputs``, Aphrodite 0.6's ``guided_*``)."""

    no_repeat_ngram_size: int | None = None
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
    mirostat_mode: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    dry_sequence_breaker_ids: list[int] | None = None
    dry_range: int | None = None
    dry_max_ngram: int | None = None
    dry_max_occurrences: int | None = None
    dry_early_exit_match_len: int | None = None
    sampler_priority: list[int | str] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
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
            if (value := getattr(self, name)) is not None:
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

    n: int | None = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM: keep only the last k prompt tokens (-1: max_model_len)

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
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
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
class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str
    content: str | None = None


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
class TokenizeRequest(OpenAIBaseModel):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
