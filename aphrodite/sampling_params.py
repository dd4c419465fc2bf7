"""Sampling parameters of one request, validated once here.

The HTTP layer turns the ``ValueError`` raised by ``SamplingParams`` into a 400,
so every limit a user can break is checked in this one place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5

@dataclass
class SamplingParams:
    """What to sample and when to stop, with vLLM/Aphrodite argument names and defaults."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
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
    # Filled by the engine: token ids that end generation unless ignore_eos.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False, compare=False)

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
            # OpenAI-style clients send 0 for "off"; vLLM treats 0 as disabled too.
            self.top_k = -1
        self._verify()

    def _verify(self) -> None:
        def bad(name: str, limit: str, value: object) -> None:
            raise ValueError(f"{name} must be {limit}, got {value!r}.")

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
        if self.temperature < 0.0:
            bad("temperature", "non-negative", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "-1 (disable) or at least 1", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "in [0, 1]", self.min_p)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "at least 1", self.max_tokens)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "at least 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"at most max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and self.logprobs < 0:
            bad("logprobs", "non-negative", self.logprobs)
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            bad("prompt_logprobs", "non-negative", self.prompt_logprobs)
        if any(not s for s in self.stop):
            bad("stop", "a list of non-empty strings", self.stop)
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer", self.seed)

    @property
    def is_greedy(self) -> bool:
        """Temperatures this small mean argmax (vLLM's convention)."""
        return self.temperature < _GREEDY_EPS

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
