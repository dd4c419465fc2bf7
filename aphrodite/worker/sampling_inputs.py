"""Per-step sampling inputs: the sampling rows' parameters as batch tensors.

Rows are anything with the attributes of ``SamplingRequest`` (today's engine ``Request`` has
them), so the worker can keep its own per-request records. Per-request state that outlives a
step (token counts, histories, mirostat mu) lives in ``SamplingState``; this module only
gathers the step's rows from it.

On the GPU every tensor goes up from pinned memory with a non-blocking copy: a plain
``torch.tensor(..., device="cuda")`` waits for the stream to drain, which would stall the host
on the step still running (async scheduling).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from aphrodite.modeling.layers.samplers.metadata import (
    BadWordRows,
    DryRows,
    MirostatRows,
    NgramRows,
    PenaltyRows,
    SamplingMetadata,
    uniform_from_seed,
)
from aphrodite.modeling.layers.samplers.truncation import quadratic_coefficients
from aphrodite.sampling_params import SamplerID, SamplingParams
from aphrodite.worker.sampling_state import SamplingState, to_device

__all__ = ["SamplingRequest", "SamplingState", "StaticRowsCache", "build_sampling_metadata", "to_device"]

_XTC_SALT = 0x5851F42D4C957F2D     # a second, independent stream of uniforms for XTC's coin


class SamplingRequest(Protocol):
    """What the sampler needs to know about one row (the names of today's engine ``Request``)."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]        # known on the host (tokens still on the device excluded)
    sample_seed: int
    num_outputs_with_pending: int      # output tokens including those still on the device
    eos_token_ids: tuple[int, ...]


def sync_state(requests: list[SamplingRequest], state: SamplingState, rows: list[int] | None = None) -> None:
    """Make sure every row that needs state has it, built from its known tokens: a new request, or one
    that came back after preemption (its history length no longer matches). ``rows``: the only rows
    whose parameters use state, when known (``_StaticRows.stateful``)."""
    for r in (requests if rows is None else [requests[i] for i in rows]):
        counts, history, _, _, miro = state.needs(r)
        if not (counts or history or miro):
            continue
        rec = state.record(r.request_id)
        expected = len(r.prompt_token_ids) + r.num_outputs_with_pending
        if (counts or history) and (rec is None or rec.length != expected):
            state.add(r)
        elif miro and state.mu_slot(r.request_id) is None:
            state.add(r)


def _row_values(p: SamplingParams, vocab_size: int) -> tuple:
    """One row's parameter-only values, in ``_StaticRows``' column order (see there). Computed once per
    parameters object and kept (``StaticRowsCache``), so a batch whose composition changes (a request
    joins or leaves) is rebuilt by transposing cached rows instead of re-deriving every row."""
    miro = p.mirostat_mode == 2
    greedy = p.is_greedy and not miro
    ok = not greedy and not miro     # rows truncation may touch
    V = vocab_size
    return (miro, greedy, ok, 0.0 if greedy else (1.0 if miro else p.temperature),
            p.temperature if ok else 1.0, ok and (p.dynatemp_min != 0 or p.dynatemp_max != 0),
            ok and p.nsigma > 0, p.top_k if ok and 0 < p.top_k < V else V,
            p.top_p if ok and p.top_p < 1.0 else 2.0, p.top_a if ok else 0.0, p.min_p if ok else 0.0,
            ok and p.tfs < 1.0, p.eta_cutoff if ok else 0.0, p.epsilon_cutoff if ok else 0.0,
            ok and p.typical_p < 1.0, ok and p.smoothing_factor != 0, p.xtc_probability if ok else 0.0,
            p.skew if ok else 0.0, p.min_tokens > 0 or bool(p._bad_words_token_ids),
            bool(p.logit_bias) or bool(p.allowed_token_ids), p.sampler_order, p.logprobs, p.best_of > p.n,
            0 if greedy else (p.top_k if not miro and 0 < p.top_k < V else -1),
            any(SamplingState.params_need(p)))


class _StaticRows:
    """What a batch's sampling parameters alone decide: the per-sampler columns, the active samplers,
    the temperature and the processors that never change (bias, allowed ids). A decode batch usually
    holds the same requests step after step, so this is built once per batch composition and kept
    (``StaticRowsCache``); only the history- and step-dependent parts are rebuilt each step.

    ``rows``: each row's ``_row_values`` (computed here when not given)."""

    def __init__(self, ps: list[SamplingParams], vocab_size: int, device: torch.device,
                 rows: list[tuple] | None = None) -> None:
        self.params = ps            # held so that the ids in the cache key stay unique
        n = len(ps)
        if rows is None:
            rows = [_row_values(p, vocab_size) for p in ps]
        (miro, greedy, plain, temp, temperature, dyn, nsigma_on, top_k, top_p, top_a, min_p, tfs_on, eta, epsilon,
         typical_on, smoothing_on, xtc_p, skew, step_row, fixed_proc, orders, logprobs, need_cum, k_host,
         stateful) = zip(*rows) if rows else ((),) * 25
        self.miro, self.plain = miro, plain
        self.all_greedy = all(greedy)
        self.all_random = all(temp)
        self.temperature = None if self.all_greedy else to_device(temp, torch.float32, device)
        active: set[SamplerID] = set()
        columns: dict[str, torch.Tensor] = {}

        def column(name: str, values: tuple, neutral, sid: SamplerID | None, dtype=torch.float32) -> bool:
            if values.count(neutral) == len(values):     # every row neutral (count: == in C)
                return False
            columns[name] = to_device(values, dtype, device)
            if sid is not None:
                active.add(sid)
            return True

        # Temperature (greedy and mirostat rows: 1) and dynatemp.
        column("temperature", temperature, 1.0, SamplerID.TEMPERATURE)
        if any(dyn):
            columns.setdefault("temperature", to_device([1.0] * n, torch.float32, device))
            active.add(SamplerID.TEMPERATURE)
            columns["dynatemp_min"] = to_device([p.dynatemp_min if d else 0.0 for p, d in zip(ps, dyn)],
                                                torch.float32, device)
            columns["dynatemp_max"] = to_device([p.dynatemp_max if d else 0.0 for p, d in zip(ps, dyn)],
                                                torch.float32, device)
            columns["dynatemp_exponent"] = to_device([p.dynatemp_exponent if d else 1.0 for p, d in zip(ps, dyn)],
                                                     torch.float32, device)
        # Truncation samplers: rows with a sampler off carry a value that changes nothing.
        if column("nsigma_on", nsigma_on, False, SamplerID.TOP_NSIGMA, torch.bool):
            columns["nsigma"] = to_device([p.nsigma for p in ps], torch.float32, device)
        has_k = column("top_k", top_k, vocab_size, SamplerID.TOP_P_TOP_K, torch.long)
        self.top_k_max = max(top_k) if has_k else 0
        column("top_p", top_p, 2.0, SamplerID.TOP_P_TOP_K)
        column("top_a", top_a, 0.0, SamplerID.TOP_A)
        column("min_p", min_p, 0.0, SamplerID.MIN_P)
        if column("tfs_on", tfs_on, False, SamplerID.TFS, torch.bool):
            columns["tfs"] = to_device([p.tfs for p in ps], torch.float32, device)
        column("eta_cutoff", eta, 0.0, SamplerID.ETA_CUTOFF)
        column("epsilon_cutoff", epsilon, 0.0, SamplerID.EPSILON_CUTOFF)
        if column("typical_p_on", typical_on, False, SamplerID.TYPICAL_P, torch.bool):
            columns["typical_p"] = to_device([p.typical_p for p in ps], torch.float32, device)
        if column("smoothing_on", smoothing_on, False, SamplerID.QUADRATIC, torch.bool):
            ks = [quadratic_coefficients(p.smoothing_factor, p.smoothing_curve) for p in ps]
            columns["smoothing_k"] = to_device([k for k, _ in ks], torch.float32, device)
            columns["smoothing_s"] = to_device([s for _, s in ks], torch.float32, device)
        self.xtc = column("xtc_probability", xtc_p, 0.0, SamplerID.XTC)
        if self.xtc:
            columns["xtc_threshold"] = to_device([p.xtc_threshold for p in ps], torch.float32, device)
        self.columns, self.active = columns, frozenset(active)
        self.skew = None
        if skew.count(0.0) != n:
            self.skew = to_device(skew, torch.float32, device)
        # Processors fixed by the parameters; rows whose bans depend on the step are listed for later.
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_vals: list[float] = []
        allow_using: list[int] = []
        allow_rows: list[int] = []
        allow_ids: list[int] = []
        self.step_rows = [i for i, f in enumerate(step_row) if f]     # min_tokens or bad words: every step
        for i in (i for i, f in enumerate(fixed_proc) if f):
            p = ps[i]
            if p.logit_bias:
                for tok, val in p.logit_bias.items():
                    if 0 <= int(tok) < vocab_size:
                        bias_rows.append(i)
                        bias_ids.append(int(tok))
                        bias_vals.append(float(val))
            if p.allowed_token_ids:
                ids = [t for t in p.allowed_token_ids if 0 <= t < vocab_size]
                allow_using.append(i)
                allow_rows.extend([i] * len(ids))
                allow_ids.extend(ids)
        self.bias = self.allowed = None
        if bias_rows:
            self.bias = (to_device(bias_rows, torch.long, device), to_device(bias_ids, torch.long, device),
                         to_device(bias_vals, torch.float32, device))
        if allow_using:
            self.allowed = (to_device(allow_using, torch.long, device), to_device(allow_rows, torch.long, device),
                            to_device(allow_ids, torch.long, device))
        # Rows grouped by sampler order (usually one group: the default order).
        by_order: dict[tuple[SamplerID, ...], list[int]] = {}
        if n and orders.count(orders[0]) == n:
            by_order[orders[0]] = list(range(n))
        else:
            for i, order in enumerate(orders):
                by_order.setdefault(order, []).append(i)
        if len(by_order) == 1:
            self.groups = [(next(iter(by_order)), None, None)]
        else:
            self.groups = [(order, to_device(rows, torch.long, device), rows) for order, rows in by_order.items()]
        want = [x for x in logprobs if x is not None]
        self.max_logprobs = max(want) if want else (0 if any(need_cum) else -1)
        self.k_host = list(k_host)
        # Rows whose parameters use per-request state (repetition samplers, mirostat): the only ones
        # ``sync_state`` has to look at.
        self.stateful = [i for i, f in enumerate(stateful) if f]


class StaticRowsCache:
    """The last batch composition's ``_StaticRows`` (keyed by the rows' parameter objects, which a
    request keeps for its lifetime), for one worker's device and vocabulary, and each of that batch's
    parameters objects' ``_row_values`` (so that a new composition only derives its new requests' rows)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._rows: _StaticRows | None = None
        self._values: dict[int, tuple[SamplingParams, tuple]] = {}     # id -> (params, its row values)
        self._vocab_size: int | None = None

    def clear(self) -> None:
        """Forget everything: called when no request is left, since a caller may change a parameters object
        in place before reusing it (the cache trusts an object not to change while its requests run)."""
        self._key = self._rows = None
        self._values = {}

    def get(self, ps: list[SamplingParams], vocab_size: int, device: torch.device) -> _StaticRows:
        key = (vocab_size, device, tuple(map(id, ps)))
        if key != self._key or self._rows is None:
            known = self._values if vocab_size == self._vocab_size else {}
            values: dict[int, tuple[SamplingParams, tuple]] = {}
            rows = []
            for p in ps:
                entry = values.get(id(p)) or known.get(id(p))
                if entry is None or entry[0] is not p:
                    entry = (p, _row_values(p, vocab_size))
                values[id(p)] = entry
                rows.append(entry[1])
            self._values, self._vocab_size = values, vocab_size
            self._rows, self._key = _StaticRows(ps, vocab_size, device, rows), key
        return self._rows


def build_sampling_metadata(requests: list[SamplingRequest], vocab_size: int, device: torch.device,
                            state: SamplingState | None = None,
                            grammar_bitmask: np.ndarray | None = None,
                            cache: StaticRowsCache | None = None) -> SamplingMetadata:
    """Gather the sampling rows' parameters into one batch of tensors.

    ``state``: the worker's persistent ``SamplingState`` (a throwaway one is built from the rows'
    token lists when omitted, as in tests). ``grammar_bitmask``: [rows, ceil(V/32)] int32 from
    the engine's grammar matchers (all bits set for unconstrained rows), or None. ``cache``: keeps
    the parameter-only part between steps of the same batch.
    """
    if state is None:
        longest = max((len(r.prompt_token_ids) + r.num_outputs_with_pending for r in requests), default=0)
        state = SamplingState(vocab_size, longest + 1, device)
    ps = [r.params for r in requests]
    st = cache.get(ps, vocab_size, device) if cache is not None else _StaticRows(ps, vocab_size, device)
    sync_state(requests, state, st.stateful)
    active = set(st.active)
    xtc_uniforms = None
    if st.xtc:
        xtc_uniforms = to_device([uniform_from_seed(r.sample_seed ^ _XTC_SALT, r.num_outputs_with_pending)
                                  if ok and r.params.xtc_probability > 0 else 1.0
                                  for r, ok in zip(requests, st.plain)], torch.float32, device)

    # Repetition samplers, from the per-request state (none to look up when no request holds any).
    penalties = dry = ngram = None
    recs = [state.record(r.request_id) for r in requests] if len(state) else [None] * len(requests)
    if len(state):
        penalties = _penalty_rows(requests, recs, state, device)
        if penalties is not None:
            active.add(SamplerID.PENALTIES)
        dry = _dry_rows(requests, recs, state, device)
        if dry is not None:
            active.add(SamplerID.DRY)
        ngram = _ngram_rows(requests, recs, state, device)
        if ngram is not None:
            active.add(SamplerID.NO_REPEAT_NGRAM)
    mirostat = None
    if any(st.miro):
        rows = [i for i, m in enumerate(st.miro) if m]
        mslots = to_device([state.mu_slot(requests[i].request_id) for i in rows], torch.long, device)
        mirostat = MirostatRows(to_device(rows, torch.long, device),
                                to_device([ps[i].mirostat_tau for i in rows], torch.float32, device),
                                to_device([ps[i].mirostat_eta for i in rows], torch.float32, device),
                                state.mu.index_select(0, mslots), state.mu, mslots)

    # Logit processors that depend on the step: min_tokens bans and bad words.
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    words: list[tuple[int, int, int, list[int], list[int]]] = []
    for i in st.step_rows:
        r, p = requests[i], ps[i]
        if r.num_outputs_with_pending < p.min_tokens:
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(r.eos_token_ids)
            ban_ids.extend(stops)
            ban_rows.extend([i] * len(stops))
        for seq in p._bad_words_token_ids or ():
            if len(seq) == 1:
                ban_rows.append(i)
                ban_ids.append(seq[0])
            elif r.num_outputs_with_pending >= len(seq) - 1 and recs[i] is not None and recs[i].history:
                L = recs[i].length
                words.append((i, seq[-1], recs[i].slot, list(range(L - len(seq) + 1, L)), seq[:-1]))
    banned = bad_words = None
    if ban_rows:
        banned = (to_device(ban_rows, torch.long, device), to_device(ban_ids, torch.long, device))
    if words:
        width = max(len(w[3]) for w in words)
        pos = np.zeros((len(words), width), dtype=np.int64)
        pre = np.full((len(words), width), -1, dtype=np.int64)
        for k, w in enumerate(words):
            pos[k, :len(w[3])] = w[3]
            pre[k, :len(w[4])] = w[4]
        bad_words = BadWordRows(to_device([w[0] for w in words], torch.long, device),
                                to_device([w[1] for w in words], torch.long, device),
                                to_device([w[2] for w in words], torch.long, device),
                                to_device(pos, torch.long, device), to_device(pre, torch.long, device))
    mask = None
    if grammar_bitmask is not None:
        mask = to_device(np.ascontiguousarray(grammar_bitmask, dtype=np.int32), torch.int32, device)

    return SamplingMetadata(
        num_rows=len(ps),
        # A greedy batch needs neither temperatures nor random draws: skip their host-to-device copies.
        temperature=st.temperature,
        all_greedy=st.all_greedy, all_random=st.all_random,
        uniforms=None if st.all_greedy else to_device(
            uniforms_from_seeds([r.sample_seed for r in requests], [r.num_outputs_with_pending for r in requests]),
            torch.float64, device),
        active=frozenset(active), columns=dict(st.columns), groups=st.groups,
        top_k_max=st.top_k_max,
        banned=banned, bias=st.bias, allowed=st.allowed, bad_words=bad_words,
        bad_words_history=state.history if bad_words is not None else None, grammar_bitmask=mask,
        penalties=penalties, dry=dry, ngram=ngram, mirostat=mirostat, skew=st.skew, xtc_uniforms=xtc_uniforms,
        max_logprobs=st.max_logprobs, k_host=st.k_host)


_M64 = (1 << 64) - 1


def uniforms_from_seeds(seeds: list[int], counters: list[int]) -> np.ndarray:
    """``uniform_from_seed(seeds[i], counters[i])`` for every row at once, bit for bit: the same
    splitmix64 steps in uint64 arithmetic, which wraps modulo 2**64 as the scalar version's masks do."""
    with np.errstate(over="ignore"):
        s = np.array([x & _M64 for x in seeds], dtype=np.uint64)
        c = np.array(counters, dtype=np.uint64) + np.uint64(1)
        z = s * np.uint64(0x9E3779B97F4A7C15) + c * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _histories(recs: list, rows: list[int], state: SamplingState, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(state slots, [R, W] histories of ``rows`` (W: the longest), their lengths) gathered on the device."""
    slots = to_device([recs[i].slot for i in rows], torch.long, device)
    width = max(recs[i].length for i in rows)
    lengths = to_device([recs[i].length for i in rows], torch.long, device)
    return slots, state.history[:, :width].index_select(0, slots), lengths


def _penalty_rows(requests: list[SamplingRequest], recs: list, state: SamplingState,
                  device: torch.device) -> PenaltyRows | None:
    rows = [i for i, rec in enumerate(recs) if rec is not None and rec.counts]
    if not rows:
        return None
    ps = [requests[i].params for i in rows]
    slots, hist, lengths = _histories(recs, rows, state, device)
    # Padding repeats the row's last token, so its write is that token's own (identical) value.
    pos = torch.arange(hist.shape[1], device=device)[None, :]
    hist = torch.where(pos < lengths[:, None], hist, hist.gather(1, (lengths - 1)[:, None]))
    return PenaltyRows(
        rows=to_device(rows, torch.long, device), host_rows=rows, history=hist,
        counts=state.counts[slots[:, None], hist],
        presence=to_device([p.presence_penalty for p in ps], torch.float32, device),
        frequency=to_device([p.frequency_penalty for p in ps], torch.float32, device),
        repetition=to_device([p.repetition_penalty for p in ps], torch.float32, device))


def _dry_rows(requests: list[SamplingRequest], recs: list, state: SamplingState,
              device: torch.device) -> DryRows | None:
    rows = [i for i, rec in enumerate(recs) if rec is not None and rec.dry]
    if not rows:
        return None
    ps = [requests[i].params for i in rows]
    slots, hist, _ = _histories(recs, rows, state, device)
    width = hist.shape[1]
    bounds = []
    for i, p in zip(rows, ps):
        length = recs[i].length
        start = max(0, length - p.dry_range) if p.dry_range > 0 else 0
        cap = min(p.dry_max_ngram, length - start - 1) if length >= 2 else -1
        bounds.append([start, max(length - 1, 0), cap, p.dry_allowed_length,
                       p.dry_max_occurrences if p.dry_max_occurrences > 0 else width + 1, p.dry_early_exit_match_len])
    return DryRows(
        rows=to_device(rows, torch.long, device), host_rows=rows, history=hist,
        suffix=state.dry_suffix[:, :width].index_select(0, slots),
        trailing=state.dry_trailing.index_select(0, slots),
        multiplier=to_device([p.dry_multiplier for p in ps], torch.float32, device),
        base=to_device([p.dry_base for p in ps], torch.float32, device),
        bounds=to_device(bounds, torch.long, device))


def _ngram_rows(requests: list[SamplingRequest], recs: list, state: SamplingState,
                device: torch.device) -> NgramRows | None:
    rows = [i for i, rec in enumerate(recs) if rec is not None and rec.ngram]
    if not rows:
        return None
    slots, hist, lengths = _histories(recs, rows, state, device)
    width = hist.shape[1]
    sizes = [requests[i].params.no_repeat_ngram_size for i in rows]
    need = [[n - 1 if recs[i].length >= n else width + 1] for i, n in zip(rows, sizes)]
    return NgramRows(rows=to_device(rows, torch.long, device), host_rows=rows, history=hist, lengths=lengths,
                     suffix=state.ngram_suffix[:, :width].index_select(0, slots),
                     need=to_device(need, torch.long, device))
