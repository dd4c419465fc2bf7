"""Logit processors that run before the ordered chain: allowed ids, bad words, min-tokens bans,
logit bias and the structured-output bitmask (``kernels.sampling.apply_bitmask_``). Each is one batched
write into the logits."""
from __future__ import annotations

import torch

from aphrodite.kernels.sampling import apply_bitmask_
from aphrodite.modeling.layers.samplers.metadata import SamplingMetadata

_NEG_INF = float("-inf")


def apply_processors(logits: torch.Tensor, md: SamplingMetadata, owned: bool = False) -> torch.Tensor:
    """Allowed ids, bad words, bans, bias, grammar: the masks that come before every sampler.
    ``owned``: ``logits`` may be written in place (nobody else reads it); otherwise the first
    processor that runs makes the copy the others then write into."""
    neg_inf = torch.full((), _NEG_INF, device=logits.device)
    if md.allowed is not None:
        using, rows, ids = md.allowed
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[using] = True
        mask[rows, ids] = False
        logits = logits.masked_fill_(mask, _NEG_INF) if owned else logits.masked_fill(mask, _NEG_INF)
        owned = True
    if md.bad_words is not None:
        bw = md.bad_words
        hist = md.bad_words_history[bw.slots[:, None], bw.positions]
        match = ((hist == bw.prefix) | (bw.prefix < 0)).all(dim=1)
        # Rows whose prefix does not match ban nothing: their write lands on a spare column.
        vocab = logits.shape[1]
        padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)
        padded.index_put_((bw.rows, torch.where(match, bw.last, vocab)), neg_inf)
        logits = padded[:, :vocab]
        owned = True
    if md.banned is not None:
        # A fill kernel, not torch.tensor(..., device=...): that would copy from the host and wait on the GPU.
        logits = logits.index_put_(md.banned, neg_inf) if owned else logits.index_put(md.banned, neg_inf)
        owned = True
    if md.bias is not None:
        rows, ids, vals = md.bias
        logits = (logits.index_put_ if owned else logits.index_put)((rows, ids), vals, accumulate=True)
        owned = True
    if md.grammar_bitmask is not None:
        if not owned or not logits.is_contiguous():
            logits = logits.clone(memory_format=torch.contiguous_format)
        logits = apply_bitmask_(logits, md.grammar_bitmask)
    return logits
