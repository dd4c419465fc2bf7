"""The fused sampler tail (``sample_candidates``: every sampler after top-k, the skew and the draw in one Triton
program per row) against a float64 NumPy transcription of each sampler's formula over the whole vocabulary row,
applied in the plan's order, then the inverse-CDF draw in token-id order."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aphrodite.kernels import sampling as ks
from aphrodite.kernels.triton_utils import HAS_TRITON
from tests.modeling.test_samplers_suite import masked, softmax  # the float64 reference helpers

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
V, N, W = 160, 12, 28          # vocabulary, rows, candidates per row (one 32-column program)


def entropy_count(x: np.ndarray) -> tuple[float, int]:
    q = softmax(x)
    nz = q > 0
    return float(-(q[nz] * np.log(q[nz])).sum()), int(np.isfinite(x).sum())


def temperature(x: np.ndarray, r: dict, ent_cnt: tuple[float, int] | None = None) -> np.ndarray:
    t = r["temperature"]
    if r["dynatemp_min"] != 0 or r["dynatemp_max"] != 0:
        ent, cnt = ent_cnt or entropy_count(x)
        with np.errstate(invalid="ignore", divide="ignore"):    # one token left: 0 / 0, as Aphrodite's
            norm = np.float64(ent) / np.log(cnt)
        t = r["dynatemp_min"] + (r["dynatemp_max"] - r["dynatemp_min"]) * norm ** r["dynatemp_exponent"]
    return x / (1e-5 if np.isnan(t) else max(t, 1e-5))


def nsigma(x: np.ndarray, r: dict, mx_std: tuple[float, float] | None = None) -> np.ndarray:
    if not r["nsigma_on"]:
        return x
    mx, std = mx_std or (x[np.isfinite(x)].max(), x[np.isfinite(x)].std(ddof=1))
    return masked(x, x < mx - r["nsigma"] * std)


def by_value(x: np.ndarray) -> np.ndarray:
    return np.argsort(-x, kind="stable")          # ties: lower token id first


def top_k_top_p(x: np.ndarray, r: dict) -> np.ndarray:
    order = by_value(x)
    x = masked(x, x < x[order[min(r["top_k"], V) - 1]])
    q = softmax(x)[order]
    drop = np.zeros(V, bool)
    drop[order[np.cumsum(q) - q >= r["top_p"]]] = True
    return masked(x, drop)


def tfs(x: np.ndarray, r: dict) -> np.ndarray:
    if not r["tfs_on"]:
        return x
    order = by_value(x)
    d2 = np.abs(np.diff(np.diff(softmax(x)[order])))
    drop = np.zeros(V, bool)
    drop[order[np.concatenate([[False], np.cumsum(d2 / d2.sum()) > r["tfs"], [True]])]] = True
    return masked(x, drop)


def eta(x: np.ndarray, r: dict) -> np.ndarray:
    q = softmax(x)
    nz = q > 0
    eps = min(r["eta_cutoff"], math.sqrt(r["eta_cutoff"]) * math.exp((q[nz] * np.log(q[nz])).sum()))
    drop = q < eps
    drop[q.argmax()] = False
    return masked(x, drop)


def epsilon(x: np.ndarray, r: dict) -> np.ndarray:
    q = softmax(x)
    drop = q < r["epsilon_cutoff"]
    drop[q.argmax()] = False
    return masked(x, drop)


def typical(x: np.ndarray, r: dict) -> np.ndarray:
    if not r["typical_p_on"]:
        return x
    q = softmax(x)
    with np.errstate(divide="ignore"):
        logq = np.log(q)
    nz = q > 0
    idx = np.argsort(np.abs((q[nz] * logq[nz]).sum() - logq), kind="stable")
    drop_sorted = np.cumsum(q[idx]) >= r["typical_p"]
    drop_sorted[0] = False
    drop = np.zeros(V, bool)
    drop[idx[drop_sorted]] = True
    return masked(x, drop)


def quadratic(x: np.ndarray, r: dict) -> np.ndarray:
    if not r["smoothing_on"]:
        return x
    d = x - x[np.isfinite(x)].max()
    y = x[np.isfinite(x)].max() + d * d * (r["smoothing_s"] * d - r["smoothing_k"])
    return np.where(np.isfinite(x), y, -np.inf)


def xtc(x: np.ndarray, r: dict) -> np.ndarray:
    q = softmax(x)
    above = np.where(q >= r["xtc_threshold"])[0]
    if not (r["xtc_u"] < r["xtc_probability"] and len(above) >= 2):
        return x
    drop = np.zeros(V, bool)
    drop[above] = True
    drop[above[np.argmin(q[above])]] = False
    return masked(x, drop)


def skew(x: np.ndarray, r: dict) -> np.ndarray:
    if r["skew"] == 0:
        return x
    cdf = np.cumsum(softmax(x)) ** math.exp(r["skew"])
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(np.diff(cdf, prepend=0.0), 0))


def draw(x: np.ndarray, r: dict) -> int:
    if r["greedy"]:
        return int(x.argmax())
    q = softmax(x)
    cdf = np.cumsum(q)
    i = min(int(np.searchsorted(cdf, r["u"] * cdf[-1], side="right")), V - 1)
    return i if q[i] > 0 else int(q.argmax())


STEP = {ks.TAIL_TEMPERATURE: temperature, ks.TAIL_NSIGMA: nsigma, ks.TAIL_TOP_K_TOP_P: top_k_top_p,
        ks.TAIL_TOP_A: lambda x, r: masked(x, softmax(x) < r["top_a"] * softmax(x).max() ** 2),
        ks.TAIL_MIN_P: lambda x, r: masked(x, softmax(x) < r["min_p"] * softmax(x).max()),
        ks.TAIL_TFS: tfs, ks.TAIL_ETA: eta, ks.TAIL_EPSILON: epsilon, ks.TAIL_TYPICAL: typical,
        ks.TAIL_QUADRATIC: quadratic, ks.TAIL_XTC: xtc, ks.TAIL_SKEW: skew}


def random_rows(g: np.random.Generator, has_p: bool) -> list[dict]:
    rows = []
    for i in range(N):
        f, c = g.uniform(0.05, 0.4), g.choice([1.0, 2.0])
        rows.append(dict(
            temperature=float(g.uniform(0.5, 1.5)), dynatemp_min=0.0, dynatemp_max=0.0, dynatemp_exponent=1.0,
            nsigma=float(g.uniform(1.0, 2.5)), nsigma_on=bool(i % 3), top_k=int(g.integers(3, W - 4)),
            top_p=float(g.uniform(0.6, 0.99)) if has_p and i % 4 else 2.0, top_a=float(g.uniform(0.3, 0.9)) * (i % 2),
            min_p=float(g.uniform(0, 0.3)) * (i % 4 != 1), tfs=float(g.uniform(0.4, 0.95)), tfs_on=bool(i % 5),
            eta_cutoff=float(g.uniform(0.01, 0.1)), epsilon_cutoff=float(g.uniform(0.01, 0.08)) * (i % 2),
            typical_p=float(g.uniform(0.5, 0.95)), typical_p_on=bool((i + 1) % 3), smoothing_k=f * (3 - c) / 2,
            smoothing_s=f * (c - 1) / 2, smoothing_on=bool(i % 2), xtc_threshold=float(g.uniform(0.05, 0.2)),
            xtc_probability=float(g.uniform(0.3, 1.0)), xtc_u=float(g.uniform()), skew=float(g.uniform(-0.5, 0.5))
            * (i % 3 != 1), u=float(g.uniform()), greedy=i % 6 == 5))
        if i % 2:
            rows[-1].update(dynatemp_min=float(g.uniform(0.3, 0.8)), dynatemp_max=float(g.uniform(0.9, 1.6)),
                            dynatemp_exponent=float(g.uniform(0.7, 1.5)))
    return rows


def run_kernel(logits: np.ndarray, rows: list[dict], plan: list[int], has_p: bool, deferred: bool,
               final: list | None = None) -> list[int]:
    x = torch.tensor(logits, dtype=torch.float32)
    values, ids = torch.topk(x, W, dim=-1)
    perm = torch.randperm(W)                          # candidates in no particular order
    values, ids = values[:, perm], ids[:, perm]
    col = lambda k, dt=torch.float32: torch.tensor([r[k] for r in rows], dtype=dt)  # noqa: E731
    names = ["temperature", "dynatemp_min", "dynatemp_max", "dynatemp_exponent", "nsigma", "top_a", "min_p", "tfs",
             "eta_cutoff", "epsilon_cutoff", "typical_p", "smoothing_k", "smoothing_s", "xtc_threshold",
             "xtc_probability"] + (["top_p"] if has_p else [])
    columns = {k: col(k) for k in names}
    columns.update({k: col(k, torch.bool) for k in ("nsigma_on", "tfs_on", "typical_p_on", "smoothing_on")})
    columns["top_k"] = col("top_k", torch.long)
    stats = None
    if deferred:
        stats = []
        for row in logits:
            ent, cnt = entropy_count(row)
            stats.append([row.max(), ent, cnt, row.std(ddof=1)])
        stats = torch.tensor(stats, dtype=torch.float32)
    greedy_t = torch.tensor([0.0 if r["greedy"] else 1.0 for r in rows])
    return ks.sample_candidates(values, ids, V, plan, columns, col("u", torch.float64), greedy_t, stats,
                                col("xtc_u"), col("skew"), deferred, deferred, final).tolist()


def reference(logits: np.ndarray, rows: list[dict], samplers: list[int], deferred: bool,
              final: list | None = None, acted: set | None = None) -> list[int]:
    """Tokens; ``final`` receives each row's last logits, ``acted`` the samplers that changed some row."""
    out = []
    for x, r in zip(logits, rows):
        x = x.astype(np.float64)
        if deferred:          # top-n-sigma then temperature, on the whole row's statistics
            x = temperature(nsigma(x, r), r, entropy_count(x))
        for s in samplers:
            y = STEP[s](x, r)
            if acted is not None and not np.array_equal(x, y):
                acted.add(s)
            x = y
        out.append(draw(x, r))
        if final is not None:
            final.append(x)
    return out


T = ks
CASES = {
    # Aphrodite's default order: temperature and top-n-sigma deferred from before top-k (row statistics).
    "default": (True, True, [T.TAIL_SORT_DESC, T.TAIL_TOP_K_TOP_P, T.TAIL_TOP_A, T.TAIL_MIN_P, T.TAIL_TFS,
                             T.TAIL_ETA, T.TAIL_EPSILON, T.TAIL_TYPICAL, T.TAIL_QUADRATIC, T.TAIL_XTC, T.TAIL_SORT_ID,
                             T.TAIL_SKEW]),
    # A custom order: TFS re-sorts after XTC and quadratic; temperature (dynatemp on the candidates) in the tail.
    "custom": (False, False, [T.TAIL_SORT_DESC, T.TAIL_TOP_K_TOP_P, T.TAIL_XTC, T.TAIL_TOP_A, T.TAIL_MIN_P,
                              T.TAIL_ETA, T.TAIL_EPSILON, T.TAIL_QUADRATIC, T.TAIL_TEMPERATURE, T.TAIL_SORT_DESC,
                              T.TAIL_TFS, T.TAIL_TYPICAL, T.TAIL_NSIGMA, T.TAIL_SORT_ID]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_candidates_against_float64_formulas(case: str) -> None:
    has_p, deferred, plan = CASES[case]
    g = np.random.default_rng(7)
    # bf16-rounded logits: ties, including at the k-th value.
    logits = torch.tensor(g.normal(0, 2.5, (N, V)), dtype=torch.float32).bfloat16().float().numpy()
    rows = random_rows(g, has_p)
    samplers = [s for s in plan if s not in (T.TAIL_SORT_DESC, T.TAIL_SORT_ID)]
    got_final, want_final = [], []
    want = reference(logits, rows, samplers, deferred, want_final)
    assert run_kernel(logits, rows, plan, has_p, deferred, got_final) == want
    # The logits the draw read: the same tokens excluded, the same probabilities.
    got_final = got_final[0].double().numpy()
    for got, ref in zip(got_final, want_final):
        assert (np.isinf(got) == np.isinf(ref)).all(), (np.where(np.isinf(got) != np.isinf(ref)))
        assert np.allclose(softmax(got), softmax(ref), rtol=1e-3, atol=1e-6)
    # The test can fail: every stage changes some row here.
    acted: set[int] = set()
    reference(logits, rows, samplers, deferred, acted=acted)
    assert acted == set(samplers), set(samplers) - acted
