"""Repetition samplers: penalties (presence, frequency, repetition), DRY and no_repeat_ngram.

They read per-request state kept on the device (``worker/sampling_state.py``): token counts,
histories and, per history position, the length of the suffix it shares with the newest token.
That suffix state is updated by one shifted compare per step, so neither sampler rescans the
history in Python nor rebuilds it from host lists.
"""
from __future__ import annotations

import torch

from aphrodite.kernels.sampling import dry_proposals, ngram_values, penalty_values
from aphrodite.modeling.layers.samplers.metadata import DryRows, NgramRows, PenaltyRows


def _lower_at(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
              inplace: bool) -> torch.Tensor:
    """``logits[rows[i], ids[i, j]] = min(itself, values[i, j])`` for every (i, j) (``inplace``: into
    ``logits``, else into a copy).

    The samplers below only ever lower a logit, and every position holding the same token of a row
    proposes a value for it: the smallest proposal is the one the sampler means (the longest DRY
    match, a banned n-gram), whichever order the duplicates land in.
    """
    flat = (rows[:, None] * logits.shape[1] + ids).reshape(-1)
    # A flat view needs contiguous rows (an earlier step may hand over a strided tensor).
    if inplace and logits.is_contiguous():
        out = logits
    else:
        out = logits.clone(memory_format=torch.contiguous_format)
    out.view(-1).scatter_reduce_(0, flat, values.reshape(-1), "amin")
    return out


def apply_penalties(logits: torch.Tensor, g: PenaltyRows, inplace: bool = False) -> torch.Tensor:
    """Presence, frequency and repetition penalties (``kernels.sampling.penalty_values``). Only the tokens of
    each row's history are read and written (positions sharing a token write the same value)."""
    new = penalty_values(logits, g.rows, g.history, g.counts, g.presence, g.frequency, g.repetition)
    rows = g.rows[:, None].expand_as(g.history)
    return (logits.index_put_ if inplace else logits.index_put)((rows, g.history), new)


def apply_dry(logits: torch.Tensor, d: DryRows, inplace: bool = False) -> torch.Tensor:
    """logits[token] -= multiplier * base ** (match_length - allowed_length) for every matched token,
    with the longest match of the token (base > 1: the lowest proposal; ``kernels.sampling.dry_proposals``).
    Only the (row, token) pairs found in the histories are read and written, never whole rows."""
    nxt, vals = dry_proposals(logits, d.rows, d.history, d.suffix, d.trailing, d.bounds, d.multiplier, d.base)
    return _lower_at(logits, d.rows, nxt, vals, inplace)


def apply_no_repeat_ngram(logits: torch.Tensor, g: NgramRows, inplace: bool = False) -> torch.Tensor:
    """Ban the tokens ``kernels.sampling.ngram_values`` finds; only the (row, token) pairs in the histories
    are touched (a token is banned when any of its positions hits)."""
    return _lower_at(logits, g.rows, g.history, ngram_values(logits, g.rows, g.history, g.suffix, g.lengths, g.need),
                     inplace)
