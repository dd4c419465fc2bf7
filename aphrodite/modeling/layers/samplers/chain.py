"""The sampler: logit processors, then Aphrodite's samplers in each row's order, then one draw.

Order: processors (allowed ids, bad words, min-tokens bans, logit bias, grammar bitmask) ->
the ordered chain (default: DRY, penalties, no_repeat_ngram, temperature, top-n-sigma,
top-p/top-k, top-a, min-p, TFS, eta, epsilon, typical-p, quadratic, XTC; ``temperature_last``
or ``sampler_priority`` reorder it per request) -> mirostat rows -> skew -> draw.

Every sampler is one batched pass over the logits and is skipped when no row uses it. When
every row has top-k on (or is greedy), top-k keeps each row's few hundred best candidates and
every later sampler, the skew and the draw run on those columns only; the temperature and
top-n-sigma just before it run there too, from one row-statistics read. The samplers that need
a sorted row (top-p, TFS) share one sort. On the GPU everything from top-k to the draw is one
Triton kernel (``sample_fused``), and DRY, the penalties and no_repeat_ngram one kernel each, so
a step with every sampler on is a few tens of launches instead of a few hundred. Rows that ask
for different orders run the chain as separate groups. Randomness is per request: a
row draws its token by inverting the CDF at one uniform number derived from (request seed,
output position), so a seeded request gets the same tokens whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aphrodite.kernels import sampling as ksamp
from aphrodite.kernels.cpu import ops as cpu_ops
from aphrodite.kernels.sampling import row_stats, sample_temperature_min_p
from aphrodite.kernels.triton_utils import use_triton
from aphrodite.modeling.layers.samplers import repetition as rep
from aphrodite.modeling.layers.samplers import truncation as tr
from aphrodite.modeling.layers.samplers.metadata import SamplingMetadata
from aphrodite.modeling.layers.samplers.processors import apply_processors
from aphrodite.sampling_params import SamplerID


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


# Top-k keeps ties at the k-th value (Aphrodite), so the candidates kept after it are the largest
# top_k plus this many: room for ties without a host sync to count them.
TIE_SLACK = 64
_INDEXED = (SamplerID.DRY, SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM)


def compact_width(md: SamplingMetadata, vocab_size: int, order: tuple[SamplerID, ...],
                  ks: list[int] | None = None) -> int:
    """How many candidate columns the chain keeps after top-k (0: it keeps the whole vocabulary).

    Known on the host: every row must have top-k on (or be greedy: it needs only its argmax), and
    no sampler that addresses tokens by id (penalties, DRY, n-grams) may come after top-k. ``ks``: the
    rows' ``k_host`` when not all of ``md``'s rows (a group)."""
    ks = md.k_host if ks is None else ks
    if not ks or min(ks) < 0 or max(ks) <= 0 or SamplerID.TOP_P_TOP_K not in md.active \
            or SamplerID.TOP_P_TOP_K not in order:
        return 0
    if any(sid in md.active for sid in order[order.index(SamplerID.TOP_P_TOP_K) + 1:] if sid in _INDEXED):
        return 0
    width = max(ks) + TIE_SLACK
    return width if 2 * width <= vocab_size else 0


def deferred_to_top_k(md: SamplingMetadata, order: tuple[SamplerID, ...], width: int) -> frozenset[SamplerID]:
    """Temperature and top-n-sigma running just before a compacting top-k: both keep the order of the
    logits, so top-k can select on the raw logits and they run on its candidates instead, from one
    ``row_stats`` read of the row (exactly: x / t < max / t - n * std / t is x < max - n * std)."""
    if not width:
        return frozenset()
    tail: list[SamplerID] = []
    for sid in reversed(order[:order.index(SamplerID.TOP_P_TOP_K)]):
        if sid not in md.active:
            continue
        if sid not in (SamplerID.TEMPERATURE, SamplerID.TOP_NSIGMA):
            break
        tail.append(sid)
    # Dynatemp measures the entropy of what it is given: not of logits top-n-sigma already cut.
    if tail == [SamplerID.TEMPERATURE, SamplerID.TOP_NSIGMA] and "dynatemp_min" in md.columns:
        return frozenset()
    return frozenset(tail)


def by_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate columns reordered by token id."""
    ids, perm = torch.sort(ids, dim=-1)
    return values.gather(1, perm), ids


def _top_candidates(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` largest logits of each row and their token ids, in no particular order."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_ops.available(torch.float32):
        return cpu_ops.topk(logits, width)
    return torch.topk(logits, width, dim=-1, sorted=False)


def _sort_columns(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate columns in descending order of value, ties by token id: the order a stable sort of the
    whole vocabulary gives, so a cut inside a run of ties keeps the same tokens either way."""
    values, ids = by_id(values, ids)
    values, perm = torch.sort(values, dim=-1, descending=True, stable=True)
    return values, ids.gather(1, perm)


def run_chain_compact(logits: torch.Tensor, md: SamplingMetadata, order: tuple[SamplerID, ...],
                      owned: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply the active samplers in ``order`` to every row of ``logits``.

    Returns ``(values, ids)``: ``ids`` is None when ``values`` still spans the vocabulary; otherwise
    top-k kept only each row's best candidates, ``values[i, j]`` is the logit of token ``ids[i, j]``
    and every token not listed is excluded. From top-k on, each sampler then costs a pass over a few
    hundred columns instead of the vocabulary, and the samplers that need the logits in descending
    order (top-p, TFS) share the order top-k produced until a sampler reorders them. Candidate columns
    are always either in descending order of value with ties by token id, or in token-id order, so
    an argmax / argmin that picks the first column among ties picks the lowest token id, as it does
    over the whole vocabulary. ``owned``: the
    repetition samplers may write into ``logits`` (nobody else reads it).
    """
    c = md.columns
    cache = tr.SortCache()
    width = compact_width(md, logits.shape[1], order)
    deferred = deferred_to_top_k(md, order, width)
    ids: torch.Tensor | None = None
    in_order = False                  # compact columns in descending order of their values
    for sid in order:
        if sid not in md.active or sid in deferred:
            continue
        if sid == SamplerID.DRY:
            if md.dry is not None:
                logits = rep.apply_dry(logits, md.dry, owned)
                owned = True
                cache.invalidate()
        elif sid == SamplerID.PENALTIES:
            if md.penalties is not None:
                logits = rep.apply_penalties(logits, md.penalties, owned)
                owned = True
                cache.invalidate()
        elif sid == SamplerID.NO_REPEAT_NGRAM:
            if md.ngram is not None:
                logits = rep.apply_no_repeat_ngram(logits, md.ngram, owned)
                owned = True
                cache.invalidate()
        elif sid == SamplerID.TEMPERATURE:
            logits = tr.apply_temperature(logits, c["temperature"], c.get("dynatemp_min"), c.get("dynatemp_max"),
                                          c.get("dynatemp_exponent"))
        elif sid == SamplerID.TOP_NSIGMA:
            logits = tr.apply_top_nsigma(logits, c["nsigma"], c["nsigma_on"])
        elif sid == SamplerID.TOP_P_TOP_K:
            if width:
                dyn = SamplerID.TEMPERATURE in deferred and "dynatemp_min" in c
                stats = row_stats(logits) if dyn or SamplerID.TOP_NSIGMA in deferred else None
                logits, ids = _sort_columns(*_top_candidates(logits, width))
                in_order = True
                if SamplerID.TOP_NSIGMA in deferred:
                    cut = tr.nsigma_threshold(stats, c["nsigma"])
                    logits = logits.masked_fill(c["nsigma_on"][:, None] & (logits < cut), float("-inf"))
                if SamplerID.TEMPERATURE in deferred:
                    logits = logits / tr.temperatures(c["temperature"], c.get("dynatemp_min"), c.get("dynatemp_max"),
                                                      c.get("dynatemp_exponent"), stats)[:, None]
                logits = tr.top_k_top_p_sorted(logits, c.get("top_k"), c.get("top_p"))
            else:
                logits = tr.apply_top_k_top_p(logits, c.get("top_k"), c.get("top_p"), md.top_k_max, cache)
        elif sid == SamplerID.TOP_A:
            logits = tr.apply_top_a(logits, c["top_a"])
        elif sid == SamplerID.MIN_P:
            logits = tr.apply_min_p(logits, c["min_p"])
        elif sid == SamplerID.TFS:
            if ids is None:
                logits = tr.apply_tfs(logits, c["tfs"], c["tfs_on"], cache)
            else:
                if not in_order:
                    logits, ids = _sort_columns(logits, ids)
                    in_order = True
                logits = tr.tfs_sorted(logits, c["tfs"], c["tfs_on"], pad=True)
        elif sid == SamplerID.ETA_CUTOFF:
            logits = tr.apply_eta_cutoff(logits, c["eta_cutoff"])
        elif sid == SamplerID.EPSILON_CUTOFF:
            logits = tr.apply_epsilon_cutoff(logits, c["epsilon_cutoff"])
        elif sid == SamplerID.TYPICAL_P:
            if ids is not None:
                logits, ids = by_id(logits, ids)
            logits = tr.apply_typical_p(logits, c["typical_p"], c["typical_p_on"])
            cache.invalidate()
            in_order = False
        elif sid == SamplerID.QUADRATIC:
            logits = tr.apply_quadratic(logits, c["smoothing_k"], c["smoothing_s"], c["smoothing_on"])
            cache.invalidate()
            in_order = False
        elif sid == SamplerID.XTC:
            logits = tr.apply_xtc(logits, c["xtc_threshold"], c["xtc_probability"], md.xtc_uniforms)
            cache.invalidate()
            in_order = False
    return logits, ids


# The GPU runs everything from top-k to the draw as one kernel per step (``kernels.sampling.sample_candidates``)
# instead of a few hundred small launches; off, it runs the same samplers one by one (the benchmark's reference).
FUSED_TAIL = True
_TAIL_CODE = {SamplerID.TEMPERATURE: ksamp.TAIL_TEMPERATURE, SamplerID.TOP_NSIGMA: ksamp.TAIL_NSIGMA,
              SamplerID.TOP_A: ksamp.TAIL_TOP_A, SamplerID.MIN_P: ksamp.TAIL_MIN_P, SamplerID.TFS: ksamp.TAIL_TFS,
              SamplerID.ETA_CUTOFF: ksamp.TAIL_ETA, SamplerID.EPSILON_CUTOFF: ksamp.TAIL_EPSILON,
              SamplerID.TYPICAL_P: ksamp.TAIL_TYPICAL, SamplerID.QUADRATIC: ksamp.TAIL_QUADRATIC,
              SamplerID.XTC: ksamp.TAIL_XTC}
# Cuts that drop only the least likely candidates (and temperature): candidates sorted by value stay sorted.
_KEEP_SORTED = frozenset({SamplerID.TEMPERATURE, SamplerID.TOP_NSIGMA, SamplerID.TOP_A, SamplerID.MIN_P,
                          SamplerID.TFS, SamplerID.ETA_CUTOFF, SamplerID.EPSILON_CUTOFF})


def tail_plan(md: SamplingMetadata, order: tuple[SamplerID, ...]) -> list[int]:
    """The stages of ``sample_candidates`` for the samplers after top-k in ``order``, then the skew: the same
    samplers ``run_chain_compact`` runs there, with a sort by value wherever it would sort (top-k/top-p, and
    TFS after a sampler that may reorder), and one by token id before the skew and the draw."""
    plan = [ksamp.TAIL_SORT_DESC, ksamp.TAIL_TOP_K_TOP_P]
    in_order = True
    for sid in order[order.index(SamplerID.TOP_P_TOP_K) + 1:]:
        if sid not in md.active:
            continue
        if sid == SamplerID.TFS and not in_order:
            plan.append(ksamp.TAIL_SORT_DESC)
            in_order = True
        plan.append(_TAIL_CODE[sid])
        in_order = in_order and sid in _KEEP_SORTED
    plan.append(ksamp.TAIL_SORT_ID)
    if md.skew is not None:
        plan.append(ksamp.TAIL_SKEW)
    return plan


def sample_fused(logits: torch.Tensor, md: SamplingMetadata, order: tuple[SamplerID, ...],
                 owned: bool = False) -> torch.Tensor | None:
    """The chain and the draw with everything from top-k on in one kernel (``sample_candidates``): the
    samplers before top-k run as in ``run_chain_compact``, then one ``row_stats`` read when temperature or
    top-n-sigma was deferred to the candidates, one top-k selection and the kernel. None when it does not
    apply (no Triton, rows without top-k, a sampler addressing token ids after top-k, mirostat): the
    caller runs the chain."""
    vocab = logits.shape[1]
    width = compact_width(md, vocab, order)
    if not FUSED_TAIL or not width or md.mirostat is not None or not use_triton(logits) \
            or not ksamp.tail_block(width, vocab):
        return None
    plan = tail_plan(md, order)
    if len(plan) > 2 * ksamp._PLAN_SLOTS:
        return None
    c = md.columns
    deferred = deferred_to_top_k(md, order, width)
    cut = order.index(SamplerID.TOP_P_TOP_K)
    logits, _ = run_chain_compact(logits, md, tuple(s for s in order[:cut] if s not in deferred), owned)
    dyn = SamplerID.TEMPERATURE in deferred and "dynatemp_min" in c
    stats = row_stats(logits) if dyn or SamplerID.TOP_NSIGMA in deferred else None
    values, ids = _top_candidates(logits, width)
    return ksamp.sample_candidates(values, ids, vocab, plan, c, md.uniforms, md.temperature, stats, md.xtc_uniforms,
                                md.skew, SamplerID.TOP_NSIGMA in deferred, SamplerID.TEMPERATURE in deferred)


def expand(values: torch.Tensor, ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Compact candidates back to logits over the vocabulary (-inf for every token not listed)."""
    if ids is None:
        return values
    return values.new_full((values.shape[0], vocab_size), float("-inf")).scatter_(1, ids, values)


def run_chain(logits: torch.Tensor, md: SamplingMetadata, order: tuple[SamplerID, ...],
              owned: bool = False) -> torch.Tensor:
    """Apply the active samplers in ``order`` to every row of ``logits``: logits over the vocabulary."""
    return expand(*run_chain_compact(logits, md, order, owned), logits.shape[1])


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
        given = logits
        logits = raw = logits.float()
        # Writable in place when the float copy is ours and the logprobs do not read it afterwards.
        owned = logits is not given and md.max_logprobs < 0
        logits = apply_processors(logits, md, owned)
        owned = logits is not given and (logits is not raw or md.max_logprobs < 0)
        in_c = logits.device.type == "cpu" and cpu_ops.available(torch.float32)
        plain = "dynatemp_min" not in md.columns and md.mirostat is None and md.skew is None
        only_temp = plain and md.active <= {SamplerID.TEMPERATURE}
        if md.all_greedy:
            values, ids = self._chain_groups(logits, md, owned)
            tokens = values.argmax(dim=-1)
            if ids is not None:
                tokens = ids.gather(1, tokens[:, None]).squeeze(1)
        elif plain and md.active <= {SamplerID.TEMPERATURE, SamplerID.MIN_P} and use_triton(logits):
            # The common case on the GPU: one fused kernel reads each row three times, writes one id.
            tokens = sample_temperature_min_p(logits, md.temperature, md.columns.get("min_p"), md.uniforms)
        elif in_c and only_temp:
            # On the CPU one C pass per row replaces softmax + cumsum + search over [N, V]
            # temporaries, with the temperature division folded in.
            tokens = cpu_ops.sample_inverse_cdf(logits, md.uniforms, md.temperature)
            if not md.all_random:
                tokens = torch.where(md.temperature > 0, tokens, logits.argmax(dim=-1))
        elif (tokens := self._sample_fused(logits, md, owned)) is not None:
            pass
        else:
            logits, ids = self._chain_groups(logits, md, owned)
            if ids is not None:
                # Candidates in token-id order: the inverse CDF walks the vocabulary's order, and an argmax
                # picks the lowest id among ties, as over the whole vocabulary.
                logits, ids = by_id(logits, ids)
            surprise = None
            if md.mirostat is not None:       # (never with candidates: mirostat rows keep the vocabulary)
                m = md.mirostat
                masked, surprise = tr.mirostat_mask(logits.index_select(0, m.rows), m.mu)
                logits = logits.index_copy(0, m.rows, masked)
            if md.skew is not None:
                logits = torch.where((md.skew != 0)[:, None], tr.apply_skew(logits, md.skew), logits)
            tokens = (cpu_ops.sample_inverse_cdf if in_c else sample_from_logits)(logits.contiguous(), md.uniforms)
            if not md.all_random:
                tokens = torch.where(md.temperature > 0, tokens, logits.argmax(dim=-1))
            if ids is not None:
                tokens = ids.gather(1, tokens[:, None]).squeeze(1)
            if surprise is not None:
                m = md.mirostat
                picked = surprise.gather(1, tokens.index_select(0, m.rows)[:, None]).squeeze(1)
                m.store.index_copy_(0, m.slots, m.mu - m.eta * (picked - m.tau))
        if md.max_logprobs < 0:
            return SamplerOutput(tokens, None, None, None, None)
        return SamplerOutput(tokens, *gather_logprobs(raw, tokens, md.max_logprobs))

    @staticmethod
    def _sample_fused(logits: torch.Tensor, md: SamplingMetadata, owned: bool) -> torch.Tensor | None:
        """``sample_fused`` for each group of rows sharing a sampler order; None unless it applies to all."""
        if not FUSED_TAIL or not md.active or md.mirostat is not None or not use_triton(logits):
            return None
        if len(md.groups) == 1:
            return sample_fused(logits, md, md.groups[0][0], owned)
        vocab = logits.shape[1]
        greedy = [all(md.k_host[r] == 0 for r in host_rows) for _, _, host_rows in md.groups]
        for (order, _, host_rows), g in zip(md.groups, greedy):
            if not g and not compact_width(md, vocab, order, [md.k_host[r] for r in host_rows]):
                return None
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for (order, rows, host_rows), g in zip(md.groups, greedy):
            sub, sub_md = logits.index_select(0, rows), md.subset(rows, host_rows)
            part = run_chain(sub, sub_md, order, owned=True).argmax(dim=-1) if g else \
                sample_fused(sub, sub_md, order, owned=True)
            if part is None:
                return None
            tokens.index_copy_(0, rows, part)
        return tokens

    @staticmethod
    def _chain_groups(logits: torch.Tensor, md: SamplingMetadata, owned: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not md.active:
            return logits, None
        if len(md.groups) == 1:
            return run_chain_compact(logits, md, md.groups[0][0], owned)
        for order, rows, host_rows in md.groups:
            sub = run_chain(logits.index_select(0, rows), md.subset(rows, host_rows), order, owned=True)
            logits = logits.index_copy(0, rows, sub)
        return logits, None


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Log-probability and rank of ``tokens`` under ``logits``, and the top-``k`` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1)
    ranks = (logp > chosen[:, None]).sum(dim=-1) + 1
    if k > 0:
        top = torch.topk(logp, k, dim=-1)
        return chosen, ranks, top.indices, top.values
    return chosen, ranks, None, None
