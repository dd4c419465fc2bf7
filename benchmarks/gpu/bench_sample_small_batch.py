"""The fused temperature + min-p draw at small batch, microseconds per call from CUDA-graph replay, for the row
counts and vocabularies of latency-1 and small batches (Llama-3's 128,256, Gemma-2's 256,000), on the two
paths: one program per row (two passes, then one block) and the split vocabulary (block maxima, block kept
masses, the draw: three launches). The table's last column is the faster path; ``SPLIT_MAX_ROWS`` in
``aphrodite/kernels/sampling.py`` is where the default switches.

Checked first on random logits (temperatures incl. 0, with and without min-p, ties): both paths against a float64
inverse-CDF draw (equal except where the target lies within float32 summation error of a cumulative boundary),
and the two paths against each other (equal on every row: a seeded draw must not depend on the batch).

    python3 benchmarks/gpu/bench_sample_small_batch.py          # one H200, ~30 s
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.kernels import sampling as ks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import eager_us, graph_us  # noqa: E402

ROWS = (1, 2, 4, 16, 64, 128, 256, 1024)
VOCABS = (128256, 256000)
EDGE = 1e-5           # |target - boundary| / Z under which float32 (any summation order) may pick the neighbour
DEV = torch.device("cuda")


def draw64(x: torch.Tensor, t: torch.Tensor, mp: torch.Tensor | None, u: torch.Tensor):
    """(token, distance of the target to the nearest cumulative boundary / Z) per row, in float64 on the GPU."""
    x = x.double()
    greedy = x.argmax(1)
    tt = torch.where(t > 0, t, 1).double()[:, None]
    s = (x - x.max(1, keepdim=True).values) / tt
    keep = s >= (torch.where(mp > 0, mp.double().clamp(min=1e-30).log(), -torch.inf)[:, None] if mp is not None
                 else -torch.inf)
    c = torch.where(keep, s.exp(), 0).cumsum(1)
    z = c[:, -1:]
    target = u.double()[:, None] * z
    j = torch.searchsorted(c, target, right=True).squeeze(1)
    n = x.shape[1]
    jc = j.clamp(max=n - 1)
    lo = torch.where(j > 0, c.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    hi = torch.where(j < n, c.gather(1, jc[:, None]).squeeze(1), z.squeeze(1))
    edge = torch.minimum(target.squeeze(1) - lo, hi - target.squeeze(1)) / z.squeeze(1)
    edge = torch.where((t > 0) & (u > 0) & (u < 1), edge, torch.inf)
    return torch.where((t > 0) & (j < n), j, greedy), edge


def check(rows: int, vocab: int, seed: int) -> tuple[int, int, float, int]:
    """(row draws checked, mismatches with float64, the largest |target - boundary| / Z among them, rows where
    the two paths differ), with and without min-p."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(rows, vocab, device=DEV, generator=g) * 2.5
    x[:, ::7] = (x[:, ::7] * 2).round() / 2                            # ties
    t = torch.tensor([0.0, 0.5, 0.8, 1.0, 1.2, 2.0], device=DEV).repeat(rows // 6 + 1)[:rows]
    mp = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.02], device=DEV).repeat(rows // 5 + 1)[:rows]
    u = torch.rand(rows, device=DEV, dtype=torch.float64, generator=g)
    checked = bad = apart = 0
    worst = 0.0
    for m in (mp, None):
        want, edge = draw64(x, t, m, u)
        got = [ks.sample_temperature_min_p(x, t, m, u, split=split) for split in (False, True)]
        apart += int((got[0] != got[1]).sum())
        for tok in got:
            miss = tok != want
            checked, bad = checked + rows, bad + int(miss.sum())
            worst = max(worst, float(edge[miss].max()) if miss.any() else 0.0)
    return checked, bad, worst, apart


def timings(rows: int, vocab: int) -> tuple:
    """(vocab, rows, one-program us, split us, the same launched eagerly): latency-1's temperature 1.0, no min-p.
    Eager: launched from Python each call (the sampler runs outside the decode graph, queued behind the forward
    pass), so it shows the host cost of three launches."""
    x = torch.randn(rows, vocab, device=DEV)
    t = torch.ones(rows, device=DEV)
    u = torch.rand(rows, device=DEV, dtype=torch.float64)
    whole = functools.partial(ks.sample_temperature_min_p, x, t, None, u, split=False)
    split = functools.partial(ks.sample_temperature_min_p, x, t, None, u, split=True)
    return vocab, rows, graph_us(whole), graph_us(split), eager_us(whole, 100, 3), eager_us(split, 100, 3)


def main() -> None:
    props = torch.cuda.get_device_properties(DEV)
    print(f"{props.name}, {props.multi_processor_count} SMs; split path at <= {ks.SPLIT_MAX_ROWS} rows")
    checked = bad = apart = 0
    worst = 0.0
    for i, (rows, vocab) in enumerate([(1, 128256), (7, 256000), (64, 128256), (300, 256000), (3, 5000)]):
        c, b, w, a = check(rows, vocab, i)
        checked, bad, worst, apart = checked + c, bad + b, max(worst, w), apart + a
    print(f"correctness vs float64 draw: {checked} row draws, {bad} differ, all with the target within {worst:.1e} "
          f"* Z of a boundary -> {'OK' if worst < EDGE else 'FAIL'} (float32 summation order: < {EDGE:.0e})")
    print(f"one program per row vs split: {apart} rows differ -> {'OK' if apart == 0 else 'FAIL'}")

    table = [timings(rows, vocab) for vocab in VOCABS for rows in ROWS]
    print("\nus per call (CUDA graph replay; e.: launched eagerly from Python), temperature 1.0, no min-p; "
          "whole: one program per row; split: blocks over programs")
    print(f"{'vocab':>7} {'rows':>4} | {'whole':>7} {'split':>7} {'x':>5} | {'e.whole':>7} {'e.split':>7} | faster")
    for vocab, rows, whole, split, e_whole, e_split in table:
        print(f"{vocab:>7} {rows:>4} | {whole:7.1f} {split:7.1f} {whole / split:5.2f} | {e_whole:7.1f} "
              f"{e_split:7.1f} | {'split' if split < whole else 'whole'}")

if __name__ == "__main__":
    main()
