"""Vectorized sampling over a batch of rows, each with its own parameters.

Order (Aphrodite's): penalties -> logit processors (bias, min_tokens bans) -> temperature
-> top-k / top-p -> min-p -> draw. Every step is one tensor operation over the batch,
and a step is skipped when no row needs it.

Randomness is per request, not per batch: a row draws its token by inverting the CDF
with one uniform number derived from (request seed, output position). The same seed
therefore gives the same tokens whatever else shares the batch, and the draw costs one
number per row instead of one per vocabulary entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aphrodite.kernels.cpu import ops as cpu_ops

_MASK64 = (1 << 64) - 1


def uniform_from_seed(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) from splitmix64(seed, counter): cheap, stateless, reproducible."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (1.0 / (1 << 53))


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters as tensors (row i samples for requests[i])."""

    temperature: torch.Tensor | None  # [N] float, 0 -> greedy; None when all rows are greedy
    all_greedy: bool
    all_random: bool                 # no greedy row: the greedy argmax can be skipped
    top_p: torch.Tensor | None       # [N] or None when no row uses it
    top_k: torch.Tensor | None       # [N] long (vocab size = off) or None
    top_k_max: int                   # the largest top_k, known on the host (0 when top_k is None)
    min_p: torch.Tensor | None
    uniforms: torch.Tensor | None    # [N] float64 draws for the inverse CDF; None when all greedy
    presence: torch.Tensor | None
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None
    output_tokens: torch.Tensor | None   # [N, L] padded with vocab_size (an out-of-range sentinel)
    prompt_tokens: torch.Tensor | None   # [N, P] padded likewise, for the repetition penalty
    banned: tuple[torch.Tensor, torch.Tensor] | None   # (rows, token ids) set to -inf
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values)
    max_logprobs: int                # largest top-N any row asked for; -1 if none needs logprobs


def _token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] occurrence counts of the (padded) token rows; the pad id falls in a dropped column."""
    counts = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.float32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    vocab = logits.shape[1]
    if md.output_tokens is None:
        return logits
    out_counts = _token_counts(md.output_tokens, vocab)
    if md.repetition is not None:
        seen = out_counts > 0
        if md.prompt_tokens is not None:
            seen |= _token_counts(md.prompt_tokens, vocab) > 0
        pen = md.repetition[:, None].expand_as(logits)
        scaled = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, scaled, logits)
    if md.frequency is not None:
        logits = logits - md.frequency[:, None] * out_counts
    if md.presence is not None:
        logits = logits - md.presence[:, None] * (out_counts > 0).float()
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None, k_max: int = 0) -> torch.Tensor:
    """Mask everything outside each row's top-k and nucleus (top-p) with -inf.

    ``k_max`` is the largest top_k, passed from the host so the GPU is not waited on to read it.
    """
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        # Only top-k: a partial selection is cheaper than a full sort.
        k_max = k_max or int(top_k.max())
        kth = torch.topk(logits, k_max, dim=-1).values.gather(1, (top_k - 1).clamp(max=k_max - 1)[:, None])
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[1]
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token if the mass strictly before it is below top_p (the first token always stays).
    before = torch.cumsum(probs, dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    if min_p is None:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds the row's uniform."""
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    idx = idx.clamp(max=logits.shape[1] - 1)
    # A zero-probability token can only be hit through rounding at its edges: step back onto mass.
    picked = probs.gather(1, idx[:, None]).squeeze(1)
    fallback = probs.argmax(dim=-1)
    return torch.where(picked > 0, idx, fallback)


def _filtered(scaled: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Temperature-scaled logits with top-k, top-p and min-p applied (masked to -inf)."""
    scaled = apply_top_k_top_p(scaled, md.top_k, md.top_p, md.top_k_max)
    return apply_min_p(scaled, md.min_p)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                 # [N] long
    logprobs: torch.Tensor | None           # [N] logprob of the sampled token (raw distribution)
    ranks: torch.Tensor | None              # [N] rank of the sampled token (1 = most likely)
    top_ids: torch.Tensor | None            # [N, K]
    top_logprobs: torch.Tensor | None       # [N, K]


class Sampler:
    """Turns a batch of logits into one token per row, plus log-probabilities when asked."""

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw = logits
        logits = apply_penalties(logits, md)
        if md.bias is not None:
            rows, ids, vals = md.bias
            logits = logits.index_put((rows, ids), vals, accumulate=True)
        if md.banned is not None:
            # A fill kernel, not torch.tensor(..., device=...): that would copy from the host and wait on the GPU.
            logits = logits.index_put(md.banned, torch.full((), float("-inf"), device=logits.device))
        if md.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            temp = md.temperature
            filters = md.top_k is not None or md.top_p is not None or md.min_p is not None
            # On the CPU one C pass per row replaces softmax + cumsum + search over [N, V]
            # temporaries, with the temperature division folded in when no filter needs it.
            in_c = logits.device.type == "cpu" and cpu_ops.available(torch.float32)
            if in_c and not filters:
                tokens = cpu_ops.sample_inverse_cdf(logits, md.uniforms, temp)
            else:
                scaled = _filtered(logits / torch.where(temp > 0, temp, 1.0)[:, None], md)
                draw = cpu_ops.sample_inverse_cdf if in_c else sample_from_logits
                tokens = draw(scaled, md.uniforms)
            if not md.all_random:
                tokens = torch.where(temp > 0, tokens, logits.argmax(dim=-1))
        if md.max_logprobs < 0:
            return SamplerOutput(tokens, None, None, None, None)
        return SamplerOutput(tokens, *gather_logprobs(raw, tokens, md.max_logprobs))


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Log-probability and rank of ``tokens`` under ``logits``, and the top-``k`` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    ranks = (logp > chosen[:, None]).sum(dim=-1) + 1
    if k > 0:
        top = torch.topk(logp, k, dim=-1)
        return chosen, ranks, top.indices, top.values
    return chosen, ranks, None, None
