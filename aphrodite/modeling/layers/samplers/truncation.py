"""Temperature and the samplers that reshape or truncate one distribution, Aphrodite's formulas.

Each function takes the batch's logits and per-row parameter columns and is one batched pass
(a row whose sampler is off gets a neutral value or is masked out of the change, so it is left
bit-for-bit alone and a seeded row draws the same token whatever shares its batch).
Samplers that need the logits in descending order share one sort through ``SortCache``.
"""
from __future__ import annotations

import math

import torch

from aphrodite.kernels.sampling import row_stats

_NEG_INF = float("-inf")
_TEMP_FLOOR = 1e-5


class SortCache:
    """One descending sort shared by the samplers that need it (top-k/top-p, TFS) over the whole vocabulary.
    Stable: among tied logits the lower token id ranks first, so a cut inside ties is reproducible.

    Temperature and threshold cuts keep the order (the tokens they mask are the sorted tail),
    so after them the cached permutation still sorts the logits; a sampler that can reorder or
    cut elsewhere (penalties, DRY, typical, quadratic, XTC, skew) invalidates it.
    """

    def __init__(self) -> None:
        self.order: torch.Tensor | None = None
        self.sorts = 0

    def invalidate(self) -> None:
        self.order = None

    def sorted(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is None:
            values, self.order = torch.sort(logits, dim=-1, descending=True, stable=True)
            self.sorts += 1
            return values, self.order
        return logits.gather(1, self.order), self.order


def temperatures(temp: torch.Tensor, dyn_min: torch.Tensor | None, dyn_max: torch.Tensor | None,
                 dyn_exp: torch.Tensor | None, stats: torch.Tensor | None) -> torch.Tensor:
    """Each row's temperature: its own, or for dynatemp rows (min or max set)
    min + (max - min) * (entropy / log(#finite tokens)) ** exponent (Aphrodite), from ``row_stats``."""
    t = temp
    if dyn_min is not None:
        dyn = (dyn_min != 0) | (dyn_max != 0)
        dyn_t = dyn_min + (dyn_max - dyn_min) * (stats[:, 1] / torch.log(stats[:, 2])).pow(dyn_exp)
        t = torch.where(dyn, dyn_t, t)
    return torch.nan_to_num(t, nan=_TEMP_FLOOR).clamp(min=_TEMP_FLOOR)


def apply_temperature(logits: torch.Tensor, temp: torch.Tensor, dyn_min: torch.Tensor | None,
                      dyn_max: torch.Tensor | None, dyn_exp: torch.Tensor | None) -> torch.Tensor:
    """Divide by the row's temperature (``temperatures``)."""
    stats = row_stats(logits) if dyn_min is not None else None
    return logits / temperatures(temp, dyn_min, dyn_max, dyn_exp, stats)[:, None]


def nsigma_threshold(stats: torch.Tensor, nsigma: torch.Tensor) -> torch.Tensor:
    """[N, 1] top-n-sigma's cut: max - nsigma * std (over the finite logits, from ``row_stats``)."""
    return (stats[:, 0] - nsigma * stats[:, 3])[:, None]


def apply_top_nsigma(logits: torch.Tensor, nsigma: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Keep logits >= max - nsigma * std (std over the finite logits, Bessel-corrected)."""
    threshold = nsigma_threshold(row_stats(logits), nsigma)
    return logits.masked_fill(on[:, None] & (logits < threshold), _NEG_INF)


def top_k_top_p_sorted(values: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
                       ) -> torch.Tensor:
    """Top-k and nucleus (top-p) on logits already in descending order: the masked values.

    As in Aphrodite, top-k keeps every token at least as likely as the k-th (ties stay), and a row
    keeps a token while the probability mass ranked strictly above it is below top_p (the top token
    always stays). Rows with top-k off carry k >= the width, rows with top-p off a value above 1.
    """
    if top_k is not None:
        kth = values.gather(1, (top_k - 1).clamp(max=values.shape[1] - 1)[:, None])
        values = values.masked_fill(values < kth, _NEG_INF)
    if top_p is not None:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        values = values.masked_fill(before >= top_p[:, None], _NEG_INF)
    return values


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      k_max: int, cache: SortCache) -> torch.Tensor:
    """Mask everything outside each row's top-k and nucleus (top-p) with -inf, over the whole vocabulary.

    ``k_max`` (the largest top_k) comes from the host so the GPU is not waited on.
    """
    if top_p is None:
        # Only top-k: a partial selection is cheaper than a full sort.
        kth = torch.topk(logits, k_max, dim=-1).values.gather(1, (top_k - 1).clamp(max=k_max - 1)[:, None])
        return logits.masked_fill(logits < kth, _NEG_INF)
    values, order = cache.sorted(logits)
    drop = top_k_top_p_sorted(values, top_k, top_p) == _NEG_INF
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), _NEG_INF)


def _log(v: torch.Tensor) -> torch.Tensor:
    """log of a per-row parameter as a [N, 1] column (0 -> -inf: the threshold drops nothing)."""
    return torch.log(v.float())[:, None]


def apply_top_a(logits: torch.Tensor, top_a: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < top_a * max_p ** 2, i.e. log p < log(top_a) + 2 log max_p (no softmax pass)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_max = logits.max(dim=-1, keepdim=True).values - lse
    return logits.masked_fill(logits - lse < _log(top_a) + 2 * log_max, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * max_p, i.e. x < max + log(min_p) (no normalization needed)."""
    threshold = logits.max(dim=-1, keepdim=True).values + _log(min_p)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def tfs_sorted(values: torch.Tensor, z: torch.Tensor, on: torch.Tensor, pad: bool) -> torch.Tensor:
    """Tail-free sampling on logits in descending order (the masked values): along the sorted
    probabilities, the normalized |second difference| is accumulated and tokens past where it
    exceeds z are dropped; as in Aphrodite the first token is always kept and the last always
    dropped. ``pad``: the columns are a row's top candidates only (the rest of the vocabulary has
    probability 0), so two zero columns stand for that rest in the second differences."""
    n, k = values.shape
    probs = torch.softmax(values, dim=-1)
    if pad:
        probs = torch.cat([probs, probs.new_zeros(n, 2)], dim=1)
    d2 = probs.diff().diff().abs()
    cdf = torch.cumsum(d2 / d2.sum(dim=-1, keepdim=True), dim=-1)
    drop = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=values.device), cdf > z[:, None],
                      torch.ones(n, 1, dtype=torch.bool, device=values.device)], dim=-1)[:, :k] & on[:, None]
    return values.masked_fill(drop, _NEG_INF)


def apply_tfs(logits: torch.Tensor, z: torch.Tensor, on: torch.Tensor, cache: SortCache) -> torch.Tensor:
    """Tail-free sampling over the whole vocabulary (``tfs_sorted`` on the shared sort)."""
    values, order = cache.sorted(logits)
    drop = tfs_sorted(values, z, on, pad=False) == _NEG_INF
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), _NEG_INF)


def _keep_top(mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return mask.scatter(1, probs.argmax(dim=1, keepdim=True), False)


def apply_eta_cutoff(logits: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Drop p < min(eta, sqrt(eta) * exp(-entropy)) (the top token stays); eta in raw probability units."""
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    neg_ent = (probs * logp).nansum(dim=-1)
    eps = torch.minimum(eta, eta.sqrt() * neg_ent.exp())[:, None]
    return logits.masked_fill(_keep_top(probs < eps, probs), _NEG_INF)


def apply_epsilon_cutoff(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """Drop p < epsilon (the top token stays): log p = x - logsumexp(x)."""
    drop = logits - torch.logsumexp(logits, dim=-1, keepdim=True) < _log(epsilon)
    return logits.masked_fill(drop.scatter(1, logits.argmax(dim=1, keepdim=True), False), _NEG_INF)


def apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: tokens ordered by |surprisal - entropy| (ties: column order, which is
    token-id order), kept until their mass reaches typical_p (the first always stays)."""
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    neg_ent = (probs * logp).nansum(dim=-1, keepdim=True)
    dev = (neg_ent - logp).abs()
    _, idx = torch.sort(dev, dim=-1, stable=True)
    drop = probs.gather(1, idx).cumsum(dim=-1) >= typical_p[:, None]
    drop[:, 0] = False
    drop &= on[:, None]
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), _NEG_INF)


def quadratic_coefficients(factor: float, curve: float) -> tuple[float, float]:
    """(k, s) of quadratic/cubic smoothing: k = factor * (3 - curve) / 2, s = factor * (curve - 1) / 2."""
    return factor * (3 - curve) / 2, factor * (curve - 1) / 2


def apply_quadratic(logits: torch.Tensor, k: torch.Tensor, s: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Quadratic/cubic smoothing around the top logit: x -> max + d^2 * (s*d - k) with d = x - max
    (kalomaze, as in Aphrodite; ``quadratic_coefficients`` gives each row's k and s)."""
    diff = logits - logits.max(dim=-1, keepdim=True).values
    delta = diff - diff * diff * (s[:, None] * diff - k[:, None])
    delta = torch.where(torch.isnan(delta), 0.0, delta)   # -inf logits stay -inf
    return torch.where(on[:, None], logits - delta, logits)


def apply_xtc(logits: torch.Tensor, threshold: torch.Tensor, probability: torch.Tensor,
              uniforms: torch.Tensor) -> torch.Tensor:
    """Exclude Top Choices: with the row's probability, when two or more tokens have p >= threshold,
    drop all of them but the least likely one."""
    above = logits - torch.logsumexp(logits, dim=-1, keepdim=True) >= _log(threshold)
    fire = (uniforms < probability) & (above.sum(dim=-1) >= 2)
    keep = torch.where(above, logits, torch.full_like(logits, float("inf"))).argmin(dim=-1, keepdim=True)
    drop = above.scatter(1, keep, False) & fire[:, None]
    return logits.masked_fill(drop, _NEG_INF)


def apply_skew(logits: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """Aphrodite's skew (after exllamav2): the CDF in vocabulary order raised to exp(skew), then
    differenced back into probabilities (returned as log-probabilities)."""
    probs = torch.softmax(logits, dim=-1)
    cdf = torch.cumsum(probs, dim=-1).clamp(min=0).pow(skew.exp()[:, None])
    probs = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1]))
    return torch.log(probs.clamp(min=0))


def mirostat_mask(logits: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirostat v2: drop tokens whose surprise -log2(p) exceeds mu (the least surprising stays).
    Returns the masked logits and the surprises, which the mu update reads after the draw."""
    surprise = torch.log_softmax(logits, dim=-1) * (-1.0 / math.log(2.0))
    drop = (surprise > mu[:, None]).scatter(1, surprise.argmin(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, _NEG_INF), surprise
