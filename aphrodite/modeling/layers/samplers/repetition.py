"""Repetition samplers: penalties (presence, frequency, repetition), DRY and no_repeat_ngram.

They read per-request state kept on the device (``worker/sampling_state.py``): token counts,
histories and, per history position, the length of the suffix it shares with the newest token.
That suffix state is updated by one shifted compare per step, so neither sampler rescans the
history in Python nor rebuilds it from host lists.
"""
from __future__ import annotations

import torch

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
    """vLLM/Aphrodite: repetition divides positive / multiplies negative logits of tokens seen in the
    prompt or output; frequency subtracts count * f; presence subtracts p once per output token seen.
    Only the tokens of each row's history are read and written (positions sharing a token write the
    same value)."""
    rows = g.rows[:, None].expand_as(g.history)
    cur = logits[rows, g.history]
    pen = g.repetition[:, None]
    new = torch.where(cur > 0, cur / pen, cur * pen)
    c = g.counts.to(logits.dtype)
    new = new - g.frequency[:, None] * c - g.presence[:, None] * (c > 0).to(logits.dtype)
    return (logits.index_put_ if inplace else logits.index_put)((rows, g.history), new)


def _dry_position_lengths(d: DryRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per history position j: (the token after j, the repeat length choosing it would extend, 0: none),
    Aphrodite's DRY rules. A token is penalized when an earlier occurrence of the newest token was
    followed by it and the tokens before both occurrences match (no sequence breaker inside): the
    match length is that shared run plus one. Only the last ``max_occurrences`` occurrences count
    (0: all), the scan stops at the first (most recent) one reaching ``early_exit``, runs are capped
    by the distance to the last breaker and ``max_ngram``, and ``range`` limits the window (0: all)."""
    R, W = d.history.shape
    pos = torch.arange(W, device=d.history.device)[None, :]
    start, last_pos, cap0, allowed, limit, early = d.bounds.split(1, dim=1)
    cur = torch.minimum(d.trailing[:, None], cap0)     # allowed >= 0: a row that cannot match has cur <= 0
    last = d.history.gather(1, last_pos)
    ep = (d.history == last) & (pos >= start) & (pos < last_pos) & (cur > allowed)
    rank = ep.flip(1).cumsum(1).flip(1)          # 1 = the most recent earlier occurrence
    match = torch.minimum(d.suffix - 1, torch.minimum(pos - start, cur))
    new_len = torch.where(ep & (rank <= limit) & (match > 0), match + 1, 0)
    hit = (new_len > 0) & (new_len >= early)
    first_hit = torch.where(hit, rank, W + 2).amin(dim=1, keepdim=True)
    new_len = torch.where(rank <= first_hit, new_len, 0)
    nxt = torch.cat([d.history[:, 1:], d.history[:, -1:]], dim=1).long()
    return nxt, new_len


def apply_dry(logits: torch.Tensor, d: DryRows, inplace: bool = False) -> torch.Tensor:
    """logits[token] -= multiplier * base ** (match_length - allowed_length) for every matched token,
    with the longest match of the token (base > 1: the lowest proposal). Only the (row, token) pairs
    found in the histories are read and written, never whole rows."""
    nxt, new_len = _dry_position_lengths(d)
    R, W = nxt.shape
    cur = logits[d.rows[:, None].expand(R, W), nxt]
    n = new_len.to(logits.dtype)
    scale = d.base[:, None] ** (n - d.bounds[:, 3:4].to(logits.dtype))
    return _lower_at(logits, d.rows, nxt, torch.where(new_len > 0, cur - d.multiplier[:, None] * scale, cur),
                     inplace)


def _ngram_hits(g: NgramRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per history position j: (its token, whether it follows an earlier copy of the last n - 1 tokens)."""
    R, W = g.history.shape
    pos = torch.arange(W, device=g.history.device)[None, :]
    # Position j's token follows an earlier copy of the last n-1 tokens when the run ending at j-1
    # shares >= n-1 tokens with the history's end (n = 1: every token already seen; position 0 has
    # no run before it, so it only hits for n = 1).
    prev = torch.nn.functional.pad(g.suffix[:, :-1], (1, 0))
    return g.history, (pos < g.lengths[:, None]) & (prev >= g.need)


def apply_no_repeat_ngram(logits: torch.Tensor, g: NgramRows, inplace: bool = False) -> torch.Tensor:
    """Ban the tokens ``_ngram_hits`` finds; only the (row, token) pairs in the histories are touched
    (a token is banned when any of its positions hits)."""
    ids, hit = _ngram_hits(g)
    cur = logits[g.rows[:, None].expand_as(ids), ids]
    return _lower_at(logits, g.rows, ids, torch.where(hit, torch.full_like(cur, float("-inf")), cur), inplace)
