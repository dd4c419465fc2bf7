"""Sampling parameters of one request, validated once here.

The HTTP layer turns the ``ValueError`` raised by ``SamplingParams`` into a 400,
so every limit a user can break is checked in this one place. Names, defaults and
limits follow Aphrodite's (``aphrodite/common/sampling_params.py``); ``docs/sampling.md``
documents every field in one table.
"""
from __future__ import annotations

import copy
import enum
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

_GREEDY_EPS = 1e-5
_MIN_TEMP = 1e-2    # Aphrodite raises 0 < temperature < 0.01 to 0.01: smaller ones overflow the logits


class SamplerID(enum.IntEnum):
    """Aphrodite's sampler ids (Kobold-compatible numbers); ``sampler_priority`` lists them by name or number."""

    DRY = 7
    PENALTIES = 6
    NO_REPEAT_NGRAM = 8
    TEMPERATURE = 5
    TOP_NSIGMA = 9
    TOP_P_TOP_K = 0
    TOP_A = 1
    MIN_P = 2
    TFS = 3
    ETA_CUTOFF = 10
    EPSILON_CUTOFF = 11
    TYPICAL_P = 4
    QUADRATIC = 12
    XTC = 13

    @classmethod
    def from_str(cls, value: str | int) -> SamplerID:
        """A sampler id from its number or its (case-insensitive) name."""
        if isinstance(value, bool):
            raise ValueError(f"Invalid sampler id {value!r}.")
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(f"Invalid sampler id {value}. Must be one of: {[int(x) for x in cls]}") from None
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        raise ValueError(f"Invalid sampler name {value!r}. Must be one of: {[x.name for x in cls]}")


# Aphrodite's default order; ``temperature_last`` moves TEMPERATURE after XTC.
DEFAULT_SAMPLER_ORDER: tuple[SamplerID, ...] = (
    SamplerID.DRY, SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM, SamplerID.TEMPERATURE, SamplerID.TOP_NSIGMA,
    SamplerID.TOP_P_TOP_K, SamplerID.TOP_A, SamplerID.MIN_P, SamplerID.TFS, SamplerID.ETA_CUTOFF,
    SamplerID.EPSILON_CUTOFF, SamplerID.TYPICAL_P, SamplerID.QUADRATIC, SamplerID.XTC)


@dataclass
class StructuredOutputsParams:
    """One structured-output constraint (vLLM's and Aphrodite 0.24's name): exactly one of ``json``
    (a JSON Schema, as a dict or a string), ``regex``, ``choice``, ``grammar`` (EBNF/GBNF, or Lark) or
    ``json_object`` (any JSON object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                 if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(f"You can only use one kind of structured outputs constraint but multiple are "
                             f"specified: {kinds}.")
        if not kinds:
            raise ValueError("You must use one kind of structured outputs constraint but none are specified.")
        if self.structural_tag is not None:
            raise ValueError("structured_outputs.structural_tag is not supported; use json, regex, choice or grammar.")
        if self.json_object is False:
            raise ValueError("structured_outputs.json_object must be true when given.")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or \
                    not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}.")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string.")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError("structured_outputs.grammar cannot be an empty string.")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            elif not isinstance(self.json, dict):
                raise ValueError("structured_outputs.json must be a JSON Schema (an object or its JSON text).")

    @property
    def kind(self) -> str:
        for k in ("json", "regex", "choice", "grammar", "json_object"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("validated in __post_init__")

    def key(self) -> tuple:
        """What identifies the compiled grammar: equal keys share one compilation."""
        kind = self.kind
        value: Any = getattr(self, kind)
        if kind == "json":
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif kind == "choice":
            value = tuple(value)
        return (kind, value, self.disable_any_whitespace, self.disable_additional_properties)


# Float fields whose values must be finite numbers (NaN or inf would poison a whole batch's logits).
_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "dynatemp_min",
                 "dynatemp_max", "dynatemp_exponent", "top_p", "top_a", "min_p", "tfs", "eta_cutoff",
                 "epsilon_cutoff", "typical_p", "smoothing_factor", "smoothing_curve", "xtc_threshold",
                 "xtc_probability", "nsigma", "skew", "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base")
_INT_FIELDS = ("no_repeat_ngram_size", "dry_allowed_length", "dry_range", "dry_max_ngram", "dry_max_occurrences",
               "dry_early_exit_match_len", "mirostat_mode", "min_tokens")


@dataclass
class SamplingParams:
    """What to sample and when to stop, with vLLM/Aphrodite argument names and defaults."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    dynatemp_min: float = 0.0
    dynatemp_max: float = 0.0
    dynatemp_exponent: float = 1.0
    temperature_last: bool = False
    top_p: float = 1.0
    top_k: int = -1
    top_a: float = 0.0
    min_p: float = 0.0
    tfs: float = 1.0
    eta_cutoff: float = 0.0
    epsilon_cutoff: float = 0.0
    typical_p: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    nsigma: float = 0.0
    skew: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 0.0
    mirostat_eta: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: list[str] | None = None
    dry_sequence_breaker_ids: list[int] = field(default_factory=list)
    dry_range: int = 0
    dry_max_ngram: int = 12
    dry_max_occurrences: int = 8
    dry_early_exit_match_len: int = 8
    sampler_priority: list[int | str] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Aphrodite's: token ids that can never be sampled (their logits set to -inf), as SillyTavern sends them.
    custom_token_bans: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine: token ids that end generation unless ignore_eos.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)
    # Filled by the engine from ``bad_words`` with its tokenizer: each word's token sequences.
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            # OpenAI-style clients send 0 for "off"; vLLM and Aphrodite treat 0 as disabled too.
            self.top_k = -1
        if self.seed == -1:
            self.seed = None     # Aphrodite: -1 means unseeded
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.bad_words = list(self.bad_words or [])
        self.custom_token_bans = list(self.custom_token_bans or [])
        self.dry_sequence_breaker_ids = list(self.dry_sequence_breaker_ids or [])
        self._verify()
        self._bad_words_token_ids = self._ban_sequences() or None
        if 0 < self.temperature < _MIN_TEMP:
            logger.warning("temperature %s is less than %s, which may cause numerical errors nan or inf in "
                           "tensors; raised to %s.", self.temperature, _MIN_TEMP, _MIN_TEMP)
            self.temperature = _MIN_TEMP
        if self.sampler_priority is not None:
            self.sampler_priority = [SamplerID.from_str(x) for x in self.sampler_priority] or None
        if self.is_greedy:
            # Aphrodite: greedy sampling turns the truncation samplers that cannot change the argmax off.
            self.top_p, self.top_k, self.min_p, self.top_a = 1.0, -1, 0.0, 0.0

    def _verify(self) -> None:
        def bad(name: str, limit: str, value: object) -> None:
            raise ValueError(f"{name} must be {limit}, got {value!r}.")

        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(name, "a number", v)
            if not math.isfinite(v):
                bad(name, "a finite number", v)
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "an integer", v)
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "at least 1", self.n)
        if not isinstance(self.best_of, int) or self.best_of < self.n:
            bad("best_of", f"an integer >= n ({self.n})", self.best_of)
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "greater than 0", self.repetition_penalty)
        if self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", "non-negative", self.no_repeat_ngram_size)
        if self.temperature < 0.0:
            bad("temperature", "non-negative", self.temperature)
        if self.dynatemp_min < 0.0:
            bad("dynatemp_min", "non-negative", self.dynatemp_min)
        if self.dynatemp_max < 0.0:
            bad("dynatemp_max", "non-negative", self.dynatemp_max)
        if self.dynatemp_exponent <= 0.0:
            bad("dynatemp_exponent", "positive", self.dynatemp_exponent)
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", "-1 or 0 (disable) or at least 1", self.top_k)
        if self.top_a < 0.0:
            bad("top_a", "non-negative", self.top_a)
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "in [0, 1]", self.min_p)
        if not 0.0 < self.tfs <= 1.0:
            bad("tfs", "in (0, 1]", self.tfs)
        if self.eta_cutoff < 0.0:
            bad("eta_cutoff", "non-negative", self.eta_cutoff)
        if self.epsilon_cutoff < 0.0:
            bad("epsilon_cutoff", "non-negative", self.epsilon_cutoff)
        if not 0.0 <= self.typical_p <= 1.0:
            bad("typical_p", "in [0, 1]", self.typical_p)
        if self.smoothing_factor < 0.0:
            bad("smoothing_factor", "non-negative", self.smoothing_factor)
        if self.xtc_threshold < 0.0:
            bad("xtc_threshold", "non-negative", self.xtc_threshold)
        if not 0.0 <= self.xtc_probability <= 1.0:
            bad("xtc_probability", "in [0, 1]", self.xtc_probability)
        if self.nsigma < 0.0:
            bad("nsigma", "non-negative", self.nsigma)
        if self.skew < 0.0:
            bad("skew", "non-negative", self.skew)
        if self.mirostat_mode not in (0, 2):
            bad("mirostat_mode", "0 (off) or 2 (Mirostat v2)", self.mirostat_mode)
        if self.mirostat_tau < 0.0:
            bad("mirostat_tau", "non-negative", self.mirostat_tau)
        if self.mirostat_eta < 0.0:
            bad("mirostat_eta", "non-negative", self.mirostat_eta)
        if self.dry_multiplier < 0.0:
            bad("dry_multiplier", "non-negative", self.dry_multiplier)
        if self.dry_base <= 1.0:
            bad("dry_base", "greater than 1", self.dry_base)
        for name in ("dry_allowed_length", "dry_range", "dry_max_ngram", "dry_max_occurrences",
                     "dry_early_exit_match_len"):
            if getattr(self, name) < 0:
                bad(name, "non-negative", getattr(self, name))
        if self.dry_sequence_breakers is not None and (
                not isinstance(self.dry_sequence_breakers, list)
                or not all(isinstance(s, str) and s for s in self.dry_sequence_breakers)):
            bad("dry_sequence_breakers", "a list of non-empty strings", self.dry_sequence_breakers)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.dry_sequence_breaker_ids):
            bad("dry_sequence_breaker_ids", "a list of token ids", self.dry_sequence_breaker_ids)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "at least 1", self.max_tokens)
        if self.min_tokens < 0:
            bad("min_tokens", "at least 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"at most max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and self.logprobs < 0:
            bad("logprobs", "non-negative", self.logprobs)
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            bad("prompt_logprobs", "non-negative", self.prompt_logprobs)
        if any(not s for s in self.stop):
            bad("stop", "a list of non-empty strings", self.stop)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "an integer", self.seed)
        if self.logit_bias:
            for val in self.logit_bias.values():
                if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                    bad("logit_bias values", "finite numbers", val)
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "a non-empty list of token ids when given", self.allowed_token_ids)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.allowed_token_ids):
                bad("allowed_token_ids", "a list of token ids", self.allowed_token_ids)
        if not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            bad("bad_words", "a list of non-empty strings", self.bad_words)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.custom_token_bans):
            bad("custom_token_bans", "a list of token ids", self.custom_token_bans)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", "a StructuredOutputsParams", self.structured_outputs)
        if self.sampler_priority is not None:
            if not isinstance(self.sampler_priority, list):
                bad("sampler_priority", "a list of sampler ids or names", self.sampler_priority)
            ids = [SamplerID.from_str(x) for x in self.sampler_priority]
            missing = set(SamplerID) - set(ids)
            if ids and missing:
                raise ValueError("Missing required samplers in sampler_priority: "
                                 f"{sorted(s.name for s in missing)}")

    @property
    def is_greedy(self) -> bool:
        """Temperatures this small mean argmax (vLLM's convention)."""
        return self.temperature < _GREEDY_EPS

    @property
    def sampler_order(self) -> tuple[SamplerID, ...]:
        """The order this request's samplers run in: ``sampler_priority`` when given (Aphrodite then
        ignores ``temperature_last``), else the default order, with temperature moved last on request."""
        if self.sampler_priority:
            return tuple(self.sampler_priority)
        if self.temperature_last:
            return tuple(s for s in DEFAULT_SAMPLER_ORDER if s != SamplerID.TEMPERATURE) + (SamplerID.TEMPERATURE,)
        return DEFAULT_SAMPLER_ORDER

    def update_from_tokenizer(self, tokenizer: Any, vocab_size: int) -> None:
        """Turn the text fields that need a tokenizer into token ids (Aphrodite's rules): each DRY
        breaker becomes the last token of ``"a" + breaker``; each bad word its token sequences with
        and without a leading space."""
        if self.dry_sequence_breakers and not self.dry_sequence_breaker_ids:
            for breaker in self.dry_sequence_breakers:
                self.dry_sequence_breaker_ids.append(tokenizer.encode(f"a{breaker}", add_special_tokens=False)[-1])
        if not self.bad_words:
            return
        seqs: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if plain:
                seqs.append(plain)
            # The spaced form counts when it is a different word token of the same length (Aphrodite's rule).
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                seqs.append(spaced)
        bad_ids = [t for s in seqs for t in s if not 0 <= t < vocab_size]
        if bad_ids:
            raise ValueError(f"bad_words produced token ids outside the vocabulary [0, {vocab_size}): {bad_ids}.")
        self._bad_words_token_ids = self._ban_sequences() + seqs

    def _ban_sequences(self) -> list[list[int]]:
        """``custom_token_bans`` as one-token bad words: the sampler sets their logits to -inf at every step."""
        return [[t] for t in dict.fromkeys(self.custom_token_bans or ())]

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
