"""A queued step's results, read back without stalling the host.

With async scheduling the host queues step N+1 before it looks at step N's sampled ids.
The sampler's output tensors are copied into pinned host memory with non-blocking copies
and a CUDA event is recorded after them; ``result()`` waits on that event only when the
host finally needs the numbers. On the CPU the tensors are already host memory and
``result()`` just reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aphrodite.modeling.layers.sampler import SamplerOutput

# (token id, logprob, rank) of the chosen token, then the top-N as (token id, logprob) pairs.
PositionLogprobs = tuple[int, float, int, list[tuple[int, float]]]


@dataclass
class ModelRunnerOutput:
    """Per scheduled request (same order): the sampled token or None for a mid-prompt chunk."""

    sampled: list[int | None]
    logprobs: list[PositionLogprobs | None]
    prompt_logprobs: list[list[PositionLogprobs] | None] = field(default_factory=list)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying a device tensor into pinned host memory (non-blocking)."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class StepFuture:
    """The host side of a queued step; ``result()`` blocks until its sampled ids have landed."""

    def __init__(self, num_requests: int, sample_idx: list[int], num_top: list[int], out: SamplerOutput | None,
                 prompt_logprobs: list[list[PositionLogprobs] | None]) -> None:
        self._num_requests = num_requests
        self._sample_idx = sample_idx
        self._num_top = num_top            # each sampled row's top-N width (its request's logprobs)
        self._prompt_logprobs = prompt_logprobs
        self._event = None
        self._tensors: list[torch.Tensor | None] = []
        if out is not None:
            self._tensors = [_to_host(t) for t in
                             (out.token_ids, out.logprobs, out.ranks, out.top_ids, out.top_logprobs)]
            if out.token_ids.device.type == "cuda":
                self._event = torch.cuda.Event()
                self._event.record()
        self._result: ModelRunnerOutput | None = None

    def done(self) -> bool:
        """True when ``result()`` would not wait for the device."""
        return self._result is not None or self._event is None or self._event.query()

    def result(self) -> ModelRunnerOutput:
        if self._result is None:
            self._result = self._read()
        return self._result

    def _read(self) -> ModelRunnerOutput:
        n = self._num_requests
        sampled: list[int | None] = [None] * n
        logprobs: list[PositionLogprobs | None] = [None] * n
        if self._tensors:
            if self._event is not None:
                self._event.synchronize()
            ids_t, lp_t, rank_t, top_i_t, top_v_t = self._tensors
            tokens = ids_t.tolist()
            if len(tokens) == n:    # every row sampled (the indices are ascending and distinct)
                sampled = list(tokens)
            else:
                for j, i in enumerate(self._sample_idx):
                    sampled[i] = tokens[j]
            if lp_t is not None:
                lp, rk = lp_t.tolist(), rank_t.tolist()
                top_i = top_i_t.tolist() if top_i_t is not None else None
                top_v = top_v_t.tolist() if top_v_t is not None else None
                for j, i in enumerate(self._sample_idx):
                    k = self._num_top[j]
                    top = list(zip(top_i[j][:k], top_v[j][:k])) if top_i is not None else []
                    logprobs[i] = (tokens[j], lp[j], rk[j], top)
        return ModelRunnerOutput(sampled, logprobs, self._prompt_logprobs)
