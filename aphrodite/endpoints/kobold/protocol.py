"""Request bodies of the KoboldAI API and how they become ``SamplingParams``.

Field names and defaults are KoboldAI's (as Aphrodite's ``KAIGenerationInputSchema`` and KoboldCpp
declare them); types are checked strictly, as for the OpenAI bodies. Fields Kobold clients send that
have no counterpart here (``rep_pen_range``, ``use_memory``, formatting switches, ...) are accepted and
ignored, as Aphrodite does. Value limits are checked once, by ``SamplingParams``.
"""
from __future__ import annotations

import json
import re
from typing import Any

from aphrodite.endpoints.openai.protocol import Int, OpenAIRequestModel, TokenIdKey, _limits
from aphrodite.sampling_params import DEFAULT_SAMPLER_ORDER, SamplerID, StructuredOutputsParams

__all__ = ["KAIGenerationInputSchema", "KAITokenizeRequest", "kobold_field", "sampler_priority"]

_SAMPLING_EPS = 1e-5  # Aphrodite's: temperatures below it are greedy; tfs is raised to it

# KoboldAI's sampler ids (sampler_order) -> Aphrodite's samplers; top-k and top-p are one sampler here.
KOBOLD_SAMPLERS = {0: SamplerID.TOP_P_TOP_K, 1: SamplerID.TOP_A, 2: SamplerID.TOP_P_TOP_K, 3: SamplerID.TFS,
                   4: SamplerID.TYPICAL_P, 5: SamplerID.TEMPERATURE, 6: SamplerID.PENALTIES}

# SamplingParams field -> the Kobold field it comes from, where the names differ (for error messages).
_KOBOLD_NAMES = {"repetition_penalty": "rep_pen", "typical_p": "typical", "epsilon_cutoff": "eps_cutoff",
                 "mirostat_mode": "mirostat", "seed": "sampler_seed", "stop": "stop_sequence",
                 "dry_range": "dry_penalty_last_n", "sampler_priority": "sampler_order", "bad_words": "banned_tokens",
                 "max_tokens": "max_length", "dynatemp_min": "dynatemp_range", "dynatemp_max": "dynatemp_range",
                 "structured_outputs": "grammar", "ignore_eos": "bypass_eos"}

# Sent by KoboldAI clients, without a counterpart here: ignored quietly (others get a warning).
_KNOWN_IGNORED = frozenset({
    "rep_pen_range", "rep_pen_slope", "use_memory", "use_story", "use_authors_note", "use_world_info",
    "use_userscripts", "soft_prompt", "disable_output_formatting", "frmtrmblln", "frmtrmspch", "frmttriminc",
    "frmtadsnsp", "singleline", "disable_input_formatting", "sampler_full_determinism", "images",
    "logprobs"})


class KAIGenerationInputSchema(OpenAIRequestModel):
    """``POST /api/v1/generate`` and ``/api/extra/generate/stream``: KoboldAI's generation input."""

    prompt: str = _limits(..., minLength=1)  # "" has no tokens unless the tokenizer adds BOS
    memory: str | None = None  # KoboldCpp's: kept whole before the prompt, which alone is cut to fit
    # KoboldCpp's defaults: the model's context, and 100 tokens (Aphrodite requires both; clients omit either).
    max_context_length: Int | None = _limits(None, minimum=1)
    max_length: Int | None = _limits(100, minimum=1)  # and at most max_context_length
    genkey: str | None = None
    n: Int | None = _limits(1, minimum=1)
    rep_pen: float | None = _limits(1.0, exclusiveMinimum=0)
    top_k: Int | None = _limits(0, minimum=-1)
    top_a: float | None = _limits(0.0, minimum=0)
    top_p: float | None = _limits(1.0, exclusiveMinimum=0, maximum=1)
    min_p: float | None = _limits(0.0, minimum=0, maximum=1)
    tfs: float | None = _limits(1.0, minimum=0, maximum=1)
    eps_cutoff: float | None = _limits(0.0, minimum=0)
    eta_cutoff: float | None = _limits(0.0, minimum=0)
    typical: float | None = _limits(1.0, minimum=0, maximum=1)
    temperature: float | None = _limits(1.0, minimum=0)
    dynatemp_range: float | None = 0.0  # temperature +- range, the low end held at 0
    dynatemp_exponent: float | None = _limits(1.0, exclusiveMinimum=0)
    smoothing_factor: float | None = _limits(0.0, minimum=0)
    smoothing_curve: float | None = 1.0
    xtc_threshold: float | None = _limits(0.1, minimum=0)
    xtc_probability: float | None = _limits(0.0, minimum=0, maximum=1)
    nsigma: float | None = _limits(0.0, minimum=0)
    presence_penalty: float | None = _limits(0.0, minimum=-2, maximum=2)
    mirostat: Int | None = _limits(0, enum=[0, 2, None])  # Mirostat v2 only
    mirostat_tau: float | None = _limits(0.0, minimum=0)
    mirostat_eta: float | None = _limits(0.0, minimum=0)
    dry_multiplier: float | None = _limits(0.0, minimum=0)
    dry_base: float | None = _limits(1.75, exclusiveMinimum=1)
    dry_allowed_length: Int | None = _limits(2, minimum=0)
    dry_penalty_last_n: Int | None = 0  # 0 or -1: the whole context
    dry_sequence_breakers: list[str] | str | None = None  # a list, or its JSON (as some clients send it)
    sampler_order: list[Int] | None = None
    sampler_seed: Int | None = None
    stop_sequence: str | list[str] | None = None
    include_stop_str_in_output: bool | None = False
    trim_stop: bool | None = None
    use_default_badwordsids: bool | None = None
    banned_tokens: list[str] | None = None
    logit_bias: dict[TokenIdKey, float] | None = None
    grammar: str | None = None
    quiet: bool | None = None
    bypass_eos: bool | None = None  # KoboldCpp's: generate past the EOS token (ignore_eos)
    render_special: bool | None = None  # KoboldCpp's: special tokens shown in the text

    def ignored_fields(self) -> list[str]:
        """Fields neither used nor a known KoboldAI field (those are ignored without a warning)."""
        return [name for name in super().ignored_fields() if name not in _KNOWN_IGNORED]

    def sampling_kwargs(self, badword_ids: list[int]) -> dict[str, Any]:
        """``SamplingParams`` keyword arguments (all but ``max_tokens``), mapped as Aphrodite's Kobold server
        maps them: top_k 0 is off, tfs is raised to 1e-5, a temperature under 1e-5 is greedy with n = 1,
        ``dynatemp_range`` spans temperature +- range, and ``use_default_badwordsids`` bans ``badword_ids``."""
        def given(name: str, default: Any) -> Any:
            value = getattr(self, name)
            return default if value is None else value

        temperature = given("temperature", 1.0)
        greedy = temperature < _SAMPLING_EPS
        kw: dict[str, Any] = {
            "n": 1 if greedy else given("n", 1),
            "temperature": temperature,
            "repetition_penalty": given("rep_pen", 1.0),
            "presence_penalty": given("presence_penalty", 0.0),
            "top_k": -1 if greedy or given("top_k", 0) == 0 else self.top_k,
            "top_p": 1.0 if greedy else given("top_p", 1.0),
            "top_a": given("top_a", 0.0),
            "min_p": given("min_p", 0.0),
            "tfs": max(_SAMPLING_EPS, given("tfs", 1.0)),
            "typical_p": given("typical", 1.0),
            "eta_cutoff": given("eta_cutoff", 0.0),
            "epsilon_cutoff": given("eps_cutoff", 0.0),
            "smoothing_factor": given("smoothing_factor", 0.0),
            "smoothing_curve": given("smoothing_curve", 1.0),
            "xtc_threshold": given("xtc_threshold", 0.1),
            "xtc_probability": given("xtc_probability", 0.0),
            "nsigma": given("nsigma", 0.0),
            "mirostat_mode": given("mirostat", 0),
            "mirostat_tau": given("mirostat_tau", 0.0),
            "mirostat_eta": given("mirostat_eta", 0.0),
            "dry_multiplier": given("dry_multiplier", 0.0),
            "dry_base": given("dry_base", 1.75),
            "dry_allowed_length": given("dry_allowed_length", 2),
            "dry_range": max(0, given("dry_penalty_last_n", 0)),  # 0 and -1: the whole context
            "dry_sequence_breakers": _strings(self.dry_sequence_breakers, json_list=True),
            "seed": self.sampler_seed,
            "stop": _strings(self.stop_sequence),
            "include_stop_str_in_output": (bool(self.include_stop_str_in_output) if self.trim_stop is None
                                           else not self.trim_stop),
            "bad_words": _strings(self.banned_tokens),
            "ignore_eos": bool(self.bypass_eos),
            "skip_special_tokens": not self.render_special,
            "sampler_priority": sampler_priority(self.sampler_order),
        }
        dynatemp_range = given("dynatemp_range", 0.0)
        if dynatemp_range > 0:
            kw["dynatemp_min"] = max(0.0, temperature - dynatemp_range)
            kw["dynatemp_max"] = temperature + dynatemp_range
        kw["dynatemp_exponent"] = given("dynatemp_exponent", 1.0)
        bias: dict[int, float] = {}
        if self.use_default_badwordsids:
            bias.update(dict.fromkeys(badword_ids, -100.0))
        if self.logit_bias:  # OpenAI's range, as the OpenAI routes clamp it
            bias.update({t: min(100.0, max(-100.0, b)) for t, b in self.logit_bias.items()})
        kw["logit_bias"] = bias or None
        if self.grammar:
            kw["structured_outputs"] = StructuredOutputsParams(grammar=self.grammar)
        return kw


def _strings(value: str | list[str] | None, json_list: bool = False) -> list[str] | None:
    """A list of strings without the empty ones (Kobold clients send ``""`` for an unused slot); a string is
    a list of one, or with ``json_list`` the list its JSON holds (SillyTavern sends DRY breakers so)."""
    if isinstance(value, str):
        parsed = None
        if json_list:
            try:
                parsed = json.loads(value)
            except ValueError:
                pass
        value = parsed if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed) else [value]
    return [x for x in value if x] if value is not None else None


class KAITokenizeRequest(OpenAIRequestModel):
    """``POST /api/extra/tokencount``."""

    prompt: str


def sampler_priority(order: list[int] | None) -> list[SamplerID] | None:
    """Aphrodite's full sampler order for a KoboldAI ``sampler_order``: the six Kobold samplers take the
    places they hold in the default order, in Kobold's order (ids beyond 6 are ignored); the others
    (DRY, min-p, XTC, ...) keep theirs."""
    if not order:
        return None
    controlled = dict.fromkeys(KOBOLD_SAMPLERS.values())
    wanted = list(dict.fromkeys(KOBOLD_SAMPLERS[i] for i in order if i in KOBOLD_SAMPLERS))
    wanted += [s for s in DEFAULT_SAMPLER_ORDER if s in controlled and s not in wanted]
    fill = iter(wanted)
    return [next(fill) if s in controlled else s for s in DEFAULT_SAMPLER_ORDER]


_LEADING_NAME = re.compile(r"^([a-z_]+)")


def kobold_field(message: str) -> tuple[str, str | None]:
    """A ``SamplingParams`` error message in the client's terms: its leading field renamed to the Kobold
    field it came from; returns (message, that field or None)."""
    m = _LEADING_NAME.match(message)
    if m is None:
        return message, None
    name = m.group(1)
    if name in _KOBOLD_NAMES:
        return _KOBOLD_NAMES[name] + message[len(name):], _KOBOLD_NAMES[name]
    return message, name if name in KAIGenerationInputSchema.model_fields else None
