"""Aphrodite's samplers, each against a float64 numpy reimplementation of its formula on a fixed
logits vector, plus exclusion statistics, order effects, DRY/penalty histories, mirostat and seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aphrodite.engine.request import Request
from aphrodite.modeling.layers.sampler import Sampler, run_chain
from aphrodite.sampling_params import DEFAULT_SAMPLER_ORDER, SamplerID, SamplingParams
from aphrodite.worker.sampling_inputs import build_sampling_metadata
from aphrodite.worker.sampling_state import SamplingState, suffix_matches

V = 40
CPU = torch.device("cpu")
# A fixed logits vector with a clear head, a long tail and one tie.
LOGITS = np.array([3.1, 2.9, 2.9, 2.2, 1.7, 1.5, 1.1, 0.8, 0.5, 0.3] + list(np.linspace(0.1, -4.0, V - 10)))


def req(p: SamplingParams, rid: str = "0", prompt=(1, 2, 3), outputs=(), seed: int = 0) -> Request:
    r = Request(rid, list(prompt), p, seed, eos_token_ids=(0,))
    r.all_token_ids.extend(outputs)
    return r


def chain_out(p: SamplingParams, sid: SamplerID, logits=LOGITS, **kw) -> np.ndarray:
    """The logits after only sampler ``sid`` ran, for one row."""
    md = build_sampling_metadata([req(p, **kw)], V, CPU)
    assert sid in md.active
    x = torch.tensor(logits, dtype=torch.float32)[None]
    return run_chain(x, md, (sid,))[0].double().numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0
    return e / e.sum()


def masked(x: np.ndarray, drop: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[drop] = -np.inf
    return y


def same(got: np.ndarray, ref: np.ndarray) -> None:
    assert (np.isinf(got) == np.isinf(ref)).all(), (np.where(np.isinf(got))[0], np.where(np.isinf(ref))[0])
    fin = np.isfinite(ref)
    assert np.allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-5)


# ---- one sampler at a time vs its formula ------------------------------------------------------------------
def test_temperature_and_dynatemp():
    same(chain_out(SamplingParams(temperature=0.7), SamplerID.TEMPERATURE), LOGITS / 0.7)
    p = SamplingParams(temperature=1.0, dynatemp_min=0.5, dynatemp_max=2.0, dynatemp_exponent=1.3)
    q = softmax(LOGITS)
    ent = -(q * np.log(q)).sum()
    t = 0.5 + 1.5 * (ent / math.log(V)) ** 1.3
    same(chain_out(p, SamplerID.TEMPERATURE), LOGITS / t)


def test_top_nsigma():
    got = chain_out(SamplingParams(nsigma=1.0), SamplerID.TOP_NSIGMA)
    same(got, masked(LOGITS, LOGITS < LOGITS.max() - 1.0 * LOGITS.std(ddof=1)))


def test_top_k_top_p():
    order = np.argsort(-LOGITS, kind="stable")
    kth = LOGITS[order[4]]
    same(chain_out(SamplingParams(top_k=5), SamplerID.TOP_P_TOP_K), masked(LOGITS, LOGITS < kth))
    q = softmax(LOGITS)[order]
    before = np.cumsum(q) - q
    drop = np.zeros(V, bool)
    drop[order[before >= 0.6]] = True
    same(chain_out(SamplingParams(top_p=0.6), SamplerID.TOP_P_TOP_K), masked(LOGITS, drop))


def test_top_a_min_p():
    q = softmax(LOGITS)
    same(chain_out(SamplingParams(top_a=0.5), SamplerID.TOP_A), masked(LOGITS, q < 0.5 * q.max() ** 2))
    same(chain_out(SamplingParams(min_p=0.3), SamplerID.MIN_P), masked(LOGITS, q < 0.3 * q.max()))


def test_tail_free():
    order = np.argsort(-LOGITS, kind="stable")
    q = softmax(LOGITS)[order]
    d2 = np.abs(np.diff(np.diff(q)))
    cdf = np.cumsum(d2 / d2.sum())
    drop_sorted = np.concatenate([[False], cdf > 0.8, [True]])
    drop = np.zeros(V, bool)
    drop[order[drop_sorted]] = True
    same(chain_out(SamplingParams(tfs=0.8), SamplerID.TFS), masked(LOGITS, drop))


def test_eta_and_epsilon_cutoffs():
    q = softmax(LOGITS)
    logq = np.log(q)
    eta = 0.02
    eps = min(eta, math.sqrt(eta) * math.exp((q * logq).sum()))
    drop = q < eps
    drop[q.argmax()] = False
    same(chain_out(SamplingParams(eta_cutoff=eta), SamplerID.ETA_CUTOFF), masked(LOGITS, drop))
    drop = q < 0.05
    drop[q.argmax()] = False
    same(chain_out(SamplingParams(epsilon_cutoff=0.05), SamplerID.EPSILON_CUTOFF), masked(LOGITS, drop))


def test_typical_p():
    q = softmax(LOGITS)
    logq = np.log(q)
    dev = np.abs((q * logq).sum() - logq)
    idx = np.argsort(dev, kind="stable")
    drop_sorted = np.cumsum(q[idx]) >= 0.5
    drop_sorted[0] = False
    drop = np.zeros(V, bool)
    drop[idx[drop_sorted]] = True
    same(chain_out(SamplingParams(typical_p=0.5), SamplerID.TYPICAL_P), masked(LOGITS, drop))


def test_quadratic_and_cubic():
    for factor, curve in ((0.4, 1.0), (0.3, 2.5)):
        k = factor * (3 - curve) / 2
        s = factor * (curve - 1) / 2
        d = LOGITS - LOGITS.max()
        ref = LOGITS.max() + d * d * (s * d - k)
        got = chain_out(SamplingParams(smoothing_factor=factor, smoothing_curve=curve), SamplerID.QUADRATIC)
        same(got, ref)


def test_xtc_removes_all_top_choices_but_the_least_likely():
    q = softmax(LOGITS)
    th = 0.08
    above = np.where(q >= th)[0]
    assert len(above) >= 2
    keep = above[np.argmin(q[above])]
    drop = np.zeros(V, bool)
    drop[above] = True
    drop[keep] = False
    same(chain_out(SamplingParams(xtc_threshold=th, xtc_probability=1.0), SamplerID.XTC), masked(LOGITS, drop))


def test_skew_and_mirostat_mask():
    from aphrodite.modeling.layers.samplers.truncation import apply_skew, mirostat_mask
    x = torch.tensor(LOGITS, dtype=torch.float32)[None]
    cdf = np.cumsum(softmax(LOGITS)) ** math.exp(0.7)
    ref = np.log(np.diff(cdf, prepend=0.0))
    # float32 differences of a CDF: compare as probabilities
    assert np.allclose(np.exp(apply_skew(x, torch.tensor([0.7]))[0].double().numpy()), np.exp(ref), atol=2e-7)
    surprise = -np.log2(softmax(LOGITS))
    got, _ = mirostat_mask(x, torch.tensor([2.5]))
    same(got[0].double().numpy(), masked(LOGITS, surprise > 2.5))


def _kernels(on: bool, monkeypatch) -> None:
    """Run the repetition samplers through the GPU's kernels (Triton's interpreter) instead of PyTorch ops."""
    if on:
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr("aphrodite.kernels.sampling._DRY_BLOCK", 8)        # several blocks per history
        monkeypatch.setattr("aphrodite.kernels.sampling._HISTORY_BLOCK", 4)


@pytest.mark.parametrize("kernel", [False, True])
def test_penalties_on_known_history(kernel, monkeypatch):
    _kernels(kernel, monkeypatch)
    prompt, outs = [1, 2, 3], [3, 4, 4, 5]
    p = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    ref = LOGITS.copy()
    for t in set(prompt + outs):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(outs):
        ref[t] -= 0.4 * outs.count(t) + 0.2
    same(chain_out(p, SamplerID.PENALTIES, prompt=prompt, outputs=outs), ref)


def dry_reference(hist: list[int], p: SamplingParams) -> dict[int, int]:
    """Aphrodite's DRY scan, written out plainly: token -> longest match length it would extend."""
    breakers = set(p.dry_sequence_breaker_ids)
    start = max(0, len(hist) - p.dry_range) if p.dry_range > 0 else 0
    h = hist[start:]
    if len(h) < 2 or h[-1] in breakers:
        return {}
    cur = 0
    for cur in range(min(len(h), p.dry_max_ngram + 1)):
        if h[-cur - 1] in breakers:
            break
    if cur <= p.dry_allowed_length:
        return {}
    ends = [i for i in range(len(h) - 1) if h[i] == h[-1]]
    if p.dry_max_occurrences and len(ends) > p.dry_max_occurrences:
        ends = ends[-p.dry_max_occurrences:]
    out: dict[int, int] = {}
    for idx in reversed(ends):
        match = 0
        for unwind in range(1, min(idx, cur) + 1):
            if h[idx - unwind] in breakers or h[idx - unwind] != h[-unwind - 1]:
                break
            match = unwind
        if match <= 0:
            continue
        out[h[idx + 1]] = max(out.get(h[idx + 1], 0), match + 1)
        if match + 1 >= p.dry_early_exit_match_len:
            break
    return out


@pytest.mark.parametrize("kw", [dict(), dict(dry_range=9), dict(dry_sequence_breaker_ids=[9]),
                                dict(dry_max_occurrences=1), dict(dry_early_exit_match_len=3),
                                dict(dry_allowed_length=1, dry_max_ngram=3)])
@pytest.mark.parametrize("kernel", [False, True])
def test_dry_on_known_histories(kw, kernel, monkeypatch):
    """The PyTorch path (CPU) and the GPU's kernel (interpreted, in 8-position chunks) against the plain scan."""
    _kernels(kernel, monkeypatch)
    hist = [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 5, 6, 7, 8, 3, 4, 5, 6, 7]
    p = SamplingParams(dry_multiplier=0.8, dry_base=1.75, **kw)
    lens = dry_reference(hist, p)
    assert lens or kw.get("dry_sequence_breaker_ids")
    ref = LOGITS.copy()
    for tok, n in lens.items():
        ref[tok] -= 0.8 * 1.75 ** (n - p.dry_allowed_length)
    same(chain_out(p, SamplerID.DRY, prompt=hist[:6], outputs=hist[6:]), ref)


@pytest.mark.parametrize("kernel", [False, True])
def test_no_repeat_ngram_against_ngram_table(kernel, monkeypatch):
    _kernels(kernel, monkeypatch)
    hist = [4, 5, 6, 4, 5, 7, 4, 5]
    for n in (1, 2, 3):
        table: dict[tuple, set] = {}
        for i in range(len(hist) - n + 1):
            table.setdefault(tuple(hist[i:i + n - 1]), set()).add(hist[i + n - 1])
        banned = table.get(tuple(hist[len(hist) - n + 1:]) if n > 1 else (), set())
        drop = np.zeros(V, bool)
        drop[list(banned)] = True
        same(chain_out(SamplingParams(no_repeat_ngram_size=n), SamplerID.NO_REPEAT_NGRAM, prompt=hist[:3],
                       outputs=hist[3:]), masked(LOGITS, drop))


def test_allowed_ids_bad_words_and_bias():
    p = SamplingParams(temperature=0.0, allowed_token_ids=[3, 7, 9], logit_bias={7: 5.0})
    md = build_sampling_metadata([req(p)], V, CPU)
    assert Sampler()(torch.tensor(LOGITS, dtype=torch.float32)[None], md).token_ids.item() == 7
    p = SamplingParams(temperature=0.0)
    p._bad_words_token_ids = [[0], [8, 2]]
    for outputs, banned in (((5,), {0}), ((5, 8), {0, 2})):
        md = build_sampling_metadata([req(p, outputs=outputs)], V, CPU)
        from aphrodite.modeling.layers.samplers.processors import apply_processors
        got = apply_processors(torch.tensor(LOGITS, dtype=torch.float32)[None], md)[0].numpy()
        assert set(np.where(np.isinf(got))[0]) == banned


# ---- statistics, order, state ------------------------------------------------------------------------------
def draw_many(p_list: list[SamplingParams], logits: np.ndarray, seeds) -> np.ndarray:
    reqs = [req(p, rid=str(i), seed=s) for i, (p, s) in enumerate(zip(p_list, seeds))]
    md = build_sampling_metadata(reqs, V, CPU)
    x = torch.tensor(logits, dtype=torch.float32)[None].repeat(len(reqs), 1)
    return Sampler()(x, md).token_ids.numpy()


@pytest.mark.parametrize("sid,kw", [
    (SamplerID.TOP_NSIGMA, dict(nsigma=0.8)), (SamplerID.TOP_A, dict(top_a=0.4)), (SamplerID.TFS, dict(tfs=0.7)),
    (SamplerID.ETA_CUTOFF, dict(eta_cutoff=0.05)), (SamplerID.EPSILON_CUTOFF, dict(epsilon_cutoff=0.04)),
    (SamplerID.TYPICAL_P, dict(typical_p=0.4)), (SamplerID.XTC, dict(xtc_threshold=0.08, xtc_probability=1.0)),
    (SamplerID.TOP_P_TOP_K, dict(top_k=6, top_p=0.7)), (SamplerID.MIN_P, dict(min_p=0.25))])
def test_never_samples_what_it_excludes(sid, kw):
    p = SamplingParams(**kw)
    excluded = np.isinf(chain_out(p, sid))
    assert excluded.any() and not excluded.all()
    out = draw_many([p] * 3000, LOGITS, range(3000))
    assert not excluded[out].any()
    assert len(set(out.tolist())) >= min(3, (~excluded).sum())


def test_order_changes_results_as_it_should():
    """min_p after a high temperature keeps more tokens than min_p on the raw logits (temperature_last)."""
    hot = dict(temperature=3.0, min_p=0.3)
    q = softmax(LOGITS / 3.0)
    keep_first = q >= 0.3 * q.max()
    q = softmax(LOGITS)
    keep_last = q >= 0.3 * q.max()
    assert keep_first.sum() > keep_last.sum()
    for p, keep in ((SamplingParams(**hot), keep_first), (SamplingParams(temperature_last=True, **hot), keep_last),
                    (SamplingParams(sampler_priority=[s for s in DEFAULT_SAMPLER_ORDER if s != SamplerID.TEMPERATURE]
                                    + [SamplerID.TEMPERATURE], **hot), keep_last)):
        out = draw_many([p] * 2000, LOGITS, range(2000))
        assert keep[out].all() and set(out.tolist()) == set(np.where(keep)[0]), p.sampler_order
    # Mixed orders in one batch: each row keeps its own.
    out = draw_many([SamplingParams(**hot), SamplingParams(temperature_last=True, **hot)] * 1000, LOGITS, range(2000))
    assert keep_first[out[0::2]].all() and keep_last[out[1::2]].all() and not keep_last[out[0::2]].all()


def test_sampler_priority_validation():
    with pytest.raises(ValueError, match="Missing required samplers"):
        SamplingParams(sampler_priority=["temperature", "min_p"])
    with pytest.raises(ValueError, match="Invalid sampler name"):
        SamplingParams(sampler_priority=["nope"])
    assert SamplingParams(sampler_priority=[int(s) for s in reversed(SamplerID)]).sampler_order[0] == SamplerID.XTC


def test_limits_and_non_finite_values_rejected():
    for kw in (dict(top_a=-1), dict(tfs=0), dict(typical_p=1.5), dict(xtc_probability=2), dict(nsigma=-1),
               dict(mirostat_mode=1), dict(dry_base=1.0), dict(dry_allowed_length=-1), dict(skew=-0.5),
               dict(dynatemp_exponent=0), dict(temperature=float("nan")), dict(min_p=float("inf")),
               dict(logit_bias={1: float("nan")}), dict(allowed_token_ids=[]), dict(no_repeat_ngram_size=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def run_steps(params: list[SamplingParams], steps: int, next_logits, seeds=None, prompt=(1, 2, 3), after=None):
    """Decode ``steps`` tokens per row with a persistent SamplingState, like the model runner does
    (``after(reqs, state)`` after every step)."""
    reqs = [req(p, rid=str(i), prompt=prompt, seed=(seeds[i] if seeds else i)) for i, p in enumerate(params)]
    state = SamplingState(V, len(prompt) + steps + 2, CPU)
    sampler = Sampler()
    for _ in range(steps):
        md = build_sampling_metadata(reqs, V, CPU, state)
        x = torch.stack([torch.as_tensor(next_logits(r), dtype=torch.float32) for r in reqs])
        toks = sampler(x, md).token_ids
        state.update([r.request_id for r in reqs], toks)
        for r, t in zip(reqs, toks.tolist()):
            r.append_token(t)
        if after is not None:
            after(reqs, state)
    return reqs, state


@pytest.mark.parametrize("kernel", [False, True])
def test_incremental_state_matches_a_rebuild(kernel, monkeypatch):
    """The per-step state update (PyTorch ops on the CPU; on the GPU one kernel, interpreted here in 4-position
    blocks) against the state rebuilt from the whole history on the host."""
    _kernels(kernel, monkeypatch)
    if kernel:
        monkeypatch.setattr("aphrodite.kernels.sampling._STATE_BLOCK", 4)
    rng = np.random.default_rng(0)
    p = SamplingParams(dry_multiplier=0.5, dry_sequence_breaker_ids=[3], no_repeat_ngram_size=3,
                       frequency_penalty=0.1, seed=1)
    loop = [4, 5, 3, 6]

    def same_as_rebuilt(reqs, state) -> None:        # after every step: the newest token changes every step
        r = reqs[0]
        rec = state.record(r.request_id)
        hist = np.asarray(r.all_token_ids)
        assert rec.length == len(hist)
        assert (state.history[rec.slot, :len(hist)].numpy() == hist).all()
        assert (state.dry_suffix[rec.slot, :len(hist)].numpy() ==
                np.minimum(suffix_matches(hist, frozenset([3]), 10 ** 6), p.dry_max_ngram + 2)).all()
        assert (state.ngram_suffix[rec.slot, :len(hist)].numpy() == suffix_matches(hist, None, 10 ** 6)).all()
        assert (state.counts[rec.slot].numpy() == np.bincount(r.output_token_ids, minlength=V)).all()
        seen.append(int(state.ngram_suffix[rec.slot, :len(hist)].max()))

    seen: list[int] = []
    run_steps([p], 30, lambda r: rng.normal(size=V) * 0.1 + 4 * np.eye(V)[loop[len(r.all_token_ids) % 4]],
              after=same_as_rebuilt)
    assert max(seen) >= 2          # runs of matches happened


def test_dry_stops_a_repeated_sequence():
    cycle = [10, 11, 12, 13, 14]

    def favour_cycle(r):
        x = np.zeros(V)
        x[cycle[(cycle.index(r.all_token_ids[-1]) + 1) % 5] if r.all_token_ids[-1] in cycle else 10] = 4.0
        return x

    def longest_repeat(seq):
        best = 0
        for i in range(len(seq)):
            for j in range(i):
                k = 0
                while i + k < len(seq) and seq[j + k] == seq[i + k] and j + k < i:
                    k += 1
                best = max(best, k)
        return best

    plain, _ = run_steps([SamplingParams(temperature=0.0)], 30, favour_cycle)
    dry, _ = run_steps([SamplingParams(temperature=0.0, dry_multiplier=1.0, dry_base=1.75, dry_allowed_length=2)],
                       30, favour_cycle)
    assert longest_repeat(plain[0].output_token_ids) >= 14
    assert longest_repeat(dry[0].output_token_ids) <= 6


def test_mirostat_converges_toward_tau():
    zipf = -1.1 * np.log(np.arange(1, V + 1))
    surprise = -np.log2(softmax(zipf))
    tau = 3.0
    reqs, state = run_steps([SamplingParams(mirostat_mode=2, mirostat_tau=tau, mirostat_eta=0.1, seed=3)], 250,
                            lambda r: zipf)
    seen = surprise[reqs[0].output_token_ids[100:]]
    assert abs(seen.mean() - tau) < 0.35, seen.mean()
    assert surprise[0] < tau < surprise.max()
    # mu survives preemption and is dropped when the request finishes.
    state.remove("0", finished=False)
    assert state.mu_slot("0") is not None
    state.remove("0", finished=True)
    assert state.mu_slot("0") is None


EVERYTHING = dict(temperature=0.9, top_p=0.95, top_k=30, min_p=0.02, top_a=0.05, tfs=0.97, eta_cutoff=1e-4,
                  epsilon_cutoff=1e-4, typical_p=0.98, smoothing_factor=0.1, xtc_probability=0.3, nsigma=3.0,
                  skew=0.2, dynatemp_min=0.7, dynatemp_max=1.1, repetition_penalty=1.1, frequency_penalty=0.1,
                  presence_penalty=0.1, dry_multiplier=0.5, no_repeat_ngram_size=4)


def test_seed_reproducible_alone_and_in_a_mixed_batch():
    rng = np.random.default_rng(5)
    table = rng.normal(size=(64, V)) * 2

    def model(r):
        return table[hash(tuple(r.all_token_ids[-2:])) % 64]

    p = SamplingParams(seed=77, **EVERYTHING)
    alone, _ = run_steps([p], 12, model, seeds=[77])
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=3),
              SamplingParams(mirostat_mode=2, mirostat_tau=2, mirostat_eta=0.2),
              SamplingParams(temperature_last=True, min_p=0.1, dry_multiplier=1.0),
              SamplingParams(sampler_priority=list(reversed(SamplerID)), xtc_probability=1.0)]
    mixed, _ = run_steps(others[:2] + [p] + others[2:], 12, model, seeds=[1, 2, 77, 4, 5, 6])
    assert mixed[2].output_token_ids == alone[0].output_token_ids


@pytest.mark.parametrize("block,split", [(16, False), (64, False), (16, True), (64, True)])
def test_fused_temperature_min_p_kernel_matches_reference(block, split, monkeypatch):
    """The GPU's fused draw (Triton, run by the interpreter here) against its PyTorch reference: one program
    per row and the split path of small batches (the 200 columns' blocks spread over programs)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from aphrodite.kernels.sampling import sample_temperature_min_p, sample_temperature_min_p_ref
    g = torch.Generator().manual_seed(block)
    x = torch.randn(8, 200, generator=g) * 3
    t = torch.tensor([1.1, 0.0, 0.7, 2.0, 1.0, 0.5, 1.3, 0.9])
    mp = torch.tensor([0.1, 0.0, 0.0, 0.3, 0.05, 0.0, 0.2, 0.5])
    u = torch.rand(8, dtype=torch.float64, generator=g)
    for m in (mp, None):
        got = sample_temperature_min_p(x, t, m, u, block=block, split=split)
        assert got.tolist() == sample_temperature_min_p_ref(x, t, m, u).tolist()
    # and the reference against the chain's own temperature -> min-p -> draw (PyTorch ops)
    monkeypatch.delenv("TRITON_INTERPRET")
    reqs = [req(SamplingParams(temperature=float(t[i]), min_p=float(mp[i])), rid=str(i)) for i in range(8)]
    md = build_sampling_metadata(reqs, 200, CPU)
    md.uniforms = u
    monkeypatch.setattr("aphrodite.modeling.layers.samplers.chain.cpu_ops.available", lambda dtype: False)
    assert Sampler()(x, md).token_ids.tolist() == sample_temperature_min_p_ref(x, md.temperature, md.columns["min_p"],
                                                                              u).tolist()


def test_top_k_candidates_match_the_whole_vocabulary(monkeypatch):
    """After top-k the chain keeps only each row's candidates (and runs temperature and top-n-sigma on them
    from one row-statistics read): same tokens and same surviving logits as the chain over the whole
    vocabulary, with bf16-rounded logits (ties at the k-th value), greedy rows and custom orders mixed in."""
    from aphrodite.modeling.layers.samplers import chain
    vocab, n = 1500, 24
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(n, vocab, generator=g) * 2.5).bfloat16().float()
    base = dict(EVERYTHING, top_k=40, xtc_probability=0.5, xtc_threshold=0.05, epsilon_cutoff=1e-3, tfs=0.9)
    greedy = dict(temperature=0.0, repetition_penalty=1.2)
    kinds = [base, dict(base, top_p=1.0, typical_p=1.0, tfs=1.0), dict(base, temperature_last=True, top_k=7),
             dict(top_k=90, temperature=0.8),
             dict(base, dynatemp_min=0.0, dynatemp_max=0.0, sampler_priority=[
                 SamplerID.DRY, SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM, SamplerID.TOP_NSIGMA,
                 SamplerID.TEMPERATURE, SamplerID.TOP_P_TOP_K, SamplerID.XTC, SamplerID.TFS, SamplerID.TOP_A,
                 SamplerID.MIN_P, SamplerID.ETA_CUTOFF, SamplerID.EPSILON_CUTOFF, SamplerID.TYPICAL_P,
                 SamplerID.QUADRATIC])]
    hist = torch.randint(0, vocab, (n, 30), generator=g).tolist()
    for kind in range(len(kinds)):
        rows = [req(SamplingParams(**(kinds[kind] if i % 5 else greedy)), rid=str(i), prompt=hist[i][:10],
                    outputs=hist[i][10:], seed=i) for i in range(n)]
        md = build_sampling_metadata(rows, vocab, CPU)
        order = md.groups[0][0]
        assert chain.compact_width(md, vocab, order) > 0
        fast_tokens = Sampler()(logits, md).token_ids
        fast = run_chain(logits, md, order)
        # bf16 input: the float copy is the sampler's own, so the processors and repetition samplers write
        # into it in place; same tokens, and the caller's tensor is left alone.
        half = logits.bfloat16()
        kept = half.clone()
        assert Sampler()(half, md).token_ids.tolist() == fast_tokens.tolist()
        assert torch.equal(half, kept)
        with monkeypatch.context() as m:
            m.setattr(chain, "compact_width", lambda *a: 0)
            slow_tokens = Sampler()(logits, md).token_ids
            slow = run_chain(logits, md, order)
        sampled = [i for i in range(n) if i % 5]      # greedy rows keep only candidates: their argmax is one
        fast, slow = fast[sampled], slow[sampled]
        assert torch.equal(torch.isinf(fast), torch.isinf(slow)), kind
        fin = torch.isfinite(slow)
        assert torch.allclose(fast[fin], slow[fin], rtol=1e-5, atol=1e-5), kind
        assert fast_tokens.tolist() == slow_tokens.tolist(), kind
    # Ties at the k-th value stay (Aphrodite's top-k): a row with 5 tokens tied at its 3rd value keeps 7.
    x = torch.full((1, vocab), -5.0)
    x[0, :2] = torch.tensor([3.0, 2.5])
    x[0, 100:105] = 1.0
    md = build_sampling_metadata([req(SamplingParams(top_k=3))], vocab, CPU)
    assert torch.isfinite(run_chain(x, md, md.groups[0][0])).sum() == 7


def test_row_stats_kernels_against_float64():
    """Dynatemp's and top-n-sigma's row statistics (max, entropy, finite count, std) in one read: the Triton
    kernel (interpreted) and the C loop against a float64 recomputation, with -inf entries."""
    from aphrodite.kernels.cpu import ops as cpu_ops
    from aphrodite.kernels.sampling import row_stats
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 700, generator=g) * 3 + 20
    x[1, ::3] = -math.inf
    x[2, :] = -math.inf
    x[2, [5, 9]] = torch.tensor([4.0, 3.0])
    rows = []
    for r in x.double().numpy():
        f = r[np.isfinite(r)]
        q = softmax(r)
        q = q[q > 0]
        rows.append([r.max(), -(q * np.log(q)).sum(), len(f), f.std(ddof=1)])
    ref = torch.tensor(rows)
    got = []
    if cpu_ops.available(torch.float32):
        got.append(cpu_ops.row_stats(x))
    if pytest.importorskip("triton"):
        import os
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            got.append(row_stats(x, block=128))
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
    assert got
    for out in got:
        assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5), out


def test_grammar_bitmask_kernels_against_numpy():
    """The structured-output bitmask (bit j of word i allows token 32*i + j) written into the logits in place:
    the C loop and the Triton kernel (interpreted) against numpy's unpacked bits, with a partial last word."""
    from aphrodite.kernels.cpu import ops as cpu_ops
    from aphrodite.kernels.sampling import apply_bitmask_, apply_bitmask_ref
    g = torch.Generator().manual_seed(4)
    vocab = 150
    x = torch.randn(3, vocab, generator=g)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, (vocab + 31) // 32), generator=g, dtype=torch.int64)
    words[1] = -1                                        # an unconstrained row: every bit set
    mask = words.to(torch.int32)
    bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little").reshape(3, -1)[:, :vocab].astype(bool)
    ref = np.where(bits, x.numpy(), -np.inf)
    outs = [apply_bitmask_ref(x, mask)]
    if cpu_ops.available(torch.float32):
        y = x.clone()
        cpu_ops.apply_bitmask_(y, mask)
        outs.append(y)
    if pytest.importorskip("triton"):
        import os
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            outs.append(apply_bitmask_(x.clone(), mask, block=64))
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
    assert len(outs) >= 2
    for out in outs:
        assert np.array_equal(out.numpy(), ref)


def test_cpu_topk_against_torch():
    """The CPU radix-select top-k (the candidates after top-k) against torch.topk: same values, indices that
    hold them, no index twice, with bf16 ties, -inf runs, a plateau wider than k and k = V."""
    from aphrodite.kernels.cpu import ops as cpu_ops
    if not cpu_ops.available(torch.float32):
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(6)
    for vocab, k in ((5000, 40), (2000, 300), (64, 64), (70, 5)):
        x = (torch.randn(6, vocab, generator=g) * 3).bfloat16().float()
        x[1, ::2] = -math.inf
        x[2] = 1.0
        x[3, :-3] = -math.inf
        x[4, 10:10 + 2 * k] = 50.0
        vals, idx = cpu_ops.topk(x, k)
        assert torch.equal(vals.sort(dim=-1, descending=True).values, torch.topk(x, k, dim=-1).values)
        assert torch.equal(x.gather(1, idx), vals)
        assert all(len(set(r)) == k for r in idx.tolist())
        if 10 + 2 * k <= vocab:
            assert idx[4].sort().values.tolist() == list(range(10, 10 + k))     # ties: the lowest indices


def _same(a, b) -> bool:
    """Deep equality of metadata fields: tensors by value, containers element-wise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_cached_parameter_rows_equal_a_fresh_build_every_step() -> None:
    """The model runner keeps a batch's parameter-only tensors between steps (``StaticRowsCache``):
    each step's metadata must equal one built from scratch, also as min_tokens bans lapse, bad-word
    prefixes appear, penalties grow and the batch changes."""
    from aphrodite.worker.sampling_inputs import StaticRowsCache
    bad = SamplingParams(temperature=0.7, top_k=5)
    bad._bad_words_token_ids = [[0], [8, 2]]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.1, min_p=0.1, min_tokens=2),
              SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.3, logit_bias={3: 2.0}), bad,
              SamplingParams(temperature=1.0, xtc_threshold=0.1, xtc_probability=0.5, typical_p=0.9),
              SamplingParams(mirostat_mode=2, mirostat_tau=3.0), SamplingParams(temperature=0.8, dry_multiplier=0.8,
                                                                              allowed_token_ids=[1, 2, 3, 8])]
    reqs = [req(p, rid=str(i), seed=i) for i, p in enumerate(params)]
    state = SamplingState(V, 16, CPU)
    cache = StaticRowsCache()
    sampler = Sampler()
    rng = np.random.default_rng(0)
    for step in range(6):
        if step == 4:
            reqs = reqs[1:]                       # a request finished: the batch changes
        md = build_sampling_metadata(reqs, V, CPU, state, cache=cache)
        fresh = build_sampling_metadata(reqs, V, CPU, state)
        assert _same(md, fresh), step
        x = torch.tensor(rng.normal(size=(len(reqs), V)), dtype=torch.float32)
        toks = sampler(x, md).token_ids
        state.update([r.request_id for r in reqs], toks)
        for r, t in zip(reqs, toks.tolist()):
            r.append_token(t)


def test_fused_tail_matches_the_samplers_one_by_one(monkeypatch):
    """On the GPU everything after top-k runs as one kernel (interpreted here): the same tokens as the chain's
    samplers launched one by one and as the chain over the whole vocabulary, for the default order, a custom
    order mixed with greedy rows (two groups) and the skew."""
    pytest.importorskip("triton")
    from aphrodite.modeling.layers.samplers import chain
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(chain, "TIE_SLACK", 6)          # few candidates: a short interpreted run
    vocab, n = 300, 10
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(n, vocab, generator=g) * 2.5).bfloat16().float()
    base = dict(EVERYTHING, top_k=12, xtc_probability=0.6, xtc_threshold=0.08, epsilon_cutoff=2e-3, tfs=0.9)
    custom = dict(base, sampler_priority=[
        SamplerID.DRY, SamplerID.PENALTIES, SamplerID.NO_REPEAT_NGRAM, SamplerID.TOP_NSIGMA, SamplerID.TOP_P_TOP_K,
        SamplerID.XTC, SamplerID.TFS, SamplerID.TOP_A, SamplerID.MIN_P, SamplerID.ETA_CUTOFF, SamplerID.EPSILON_CUTOFF,
        SamplerID.TYPICAL_P, SamplerID.QUADRATIC, SamplerID.TEMPERATURE])
    hist = torch.randint(0, vocab, (n, 20), generator=g).tolist()
    calls: list[int] = []
    real = chain.sample_fused
    monkeypatch.setattr(chain, "sample_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    for kinds in ([base], [custom, dict(temperature=0.0, repetition_penalty=1.2)]):
        rows = [req(SamplingParams(**kinds[i % len(kinds)]), rid=str(i), prompt=hist[i][:8], outputs=hist[i][8:],
                    seed=i) for i in range(n)]
        md = build_sampling_metadata(rows, vocab, CPU)
        calls.clear()
        fused = Sampler()(logits, md).token_ids.tolist()
        assert calls
        monkeypatch.setattr(chain, "FUSED_TAIL", False)
        assert fused == Sampler()(logits, md).token_ids.tolist()
        with monkeypatch.context() as m:
            m.setattr(chain, "compact_width", lambda *a: 0)
            assert fused == Sampler()(logits, md).token_ids.tolist()
        monkeypatch.setattr(chain, "FUSED_TAIL", True)
