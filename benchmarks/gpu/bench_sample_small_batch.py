"""The fused temperature + min-p draw at small batch: one program per row (the old path) vs the split vocabulary
(chunk max, chunk kept mass, scan of one chunk), microseconds per call from CUDA-graph replay, for the row
counts and vocabularies of latency-1 and small batches (Llama-3's 128,256, Gemma-2's 256,000).

For each (rows, vocab): the old path, the split path at the rule's chunk (``split_chunk``, 0 = the rule keeps
one program per row) and at fixed chunks, so the table shows where the rule should switch (the constants
``SPLIT_MAX_ROWS``, ``SPLIT_MIN_CHUNK``, ``SPLIT_MAX_CHUNK``, ``SPLIT_PROGRAMS_PER_SM`` in
``aphrodite/kernels/sampling.py``). Both paths are first checked against a float64 inverse-CDF draw on random
logits (temperatures incl. 0, with and without min-p, ties): tokens must be equal except where the target lies
within float32 summation error of a cumulative boundary.

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
CHUNKS = (2048, 4096, 8192, 16384, 32768)
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


def check(rows: int, vocab: int, seed: int) -> tuple[int, int, float]:
    """(row draws checked, mismatches, the largest |target - boundary| / Z among them) over both paths and the
    rule's choice, with and without min-p."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(rows, vocab, device=DEV, generator=g) * 2.5
    x[:, ::7] = (x[:, ::7] * 2).round() / 2                            # ties
    t = torch.tensor([0.0, 0.5, 0.8, 1.0, 1.2, 2.0], device=DEV).repeat(rows // 6 + 1)[:rows]
    mp = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.02], device=DEV).repeat(rows // 5 + 1)[:rows]
    u = torch.rand(rows, device=DEV, dtype=torch.float64, generator=g)
    checked = bad = 0
    worst = 0.0
    for m in (mp, None):
        want, edge = draw64(x, t, m, u)
        for chunk in (0, None, 2048, 8192):
            miss = ks.sample_temperature_min_p(x, t, m, u, chunk=chunk) != want
            checked, bad = checked + rows, bad + int(miss.sum())
            worst = max(worst, float(edge[miss].max()) if miss.any() else 0.0)
    return checked, bad, worst


def timings(rows: int, vocab: int) -> tuple:
    """(vocab, rows, old us, the rule's chunk, its us, us at each fixed chunk, old and rule eager us): latency-1's
    temperature 1.0, no min-p. Eager: launched from Python each call (the sampler runs outside the decode graph,
    its launches queued behind the forward pass), so it shows the three launches' host cost."""
    x = torch.randn(rows, vocab, device=DEV)
    t = torch.ones(rows, device=DEV)
    u = torch.rand(rows, device=DEV, dtype=torch.float64)
    draw = functools.partial(ks.sample_temperature_min_p, x, t, None, u)
    first = functools.partial(draw, chunk=0)
    old = graph_us(first)
    auto = ks.split_chunk(rows, vocab, DEV)
    new = graph_us(draw) if auto else old
    fixed = [graph_us(functools.partial(draw, chunk=c)) for c in CHUNKS]
    return vocab, rows, old, auto, new, fixed, eager_us(first, 100, 3), eager_us(draw, 100, 3)


def main() -> None:
    props = torch.cuda.get_device_properties(DEV)
    print(f"{props.name}, {props.multi_processor_count} SMs; rule: split at <= {ks.SPLIT_MAX_ROWS} rows, chunk in "
          f"[{ks.SPLIT_MIN_CHUNK}, {ks.SPLIT_MAX_CHUNK}] for ~{ks.SPLIT_PROGRAMS_PER_SM} programs per SM")
    checked = bad = 0
    worst = 0.0
    for i, (rows, vocab) in enumerate([(1, 128256), (7, 256000), (64, 128256), (300, 256000), (3, 5000)]):
        c, b, w = check(rows, vocab, i)
        checked, bad, worst = checked + c, bad + b, max(worst, w)
    print(f"correctness vs float64 draw: {checked} row draws, {bad} differ, all with the target within {worst:.1e} "
          f"* Z of a boundary -> {'OK' if worst < EDGE else 'FAIL'} (float32 summation order: < {EDGE:.0e})")

    table = [timings(rows, vocab) for vocab in VOCABS for rows in ROWS]
    print("\nus per call (CUDA graph replay; eager: launched from Python), temperature 1.0, no min-p; "
          "'rule' = split_chunk's chunk (0: old path), x = old / rule")
    print(f"{'vocab':>7} {'rows':>4} {'old':>7} {'rule':>6} {'new':>7} {'x':>5} | "
          + " ".join(f"{'c' + str(c):>7}" for c in CHUNKS) + f" | {'best':>6} | {'e.old':>6} {'e.new':>6}")
    for vocab, rows, old, auto, new, fixed, e_old, e_new in table:
        best = min(range(len(CHUNKS)), key=lambda k: fixed[k])
        best_s = f"c{CHUNKS[best]}" if fixed[best] < old else "old"
        print(f"{vocab:>7} {rows:>4} {old:7.1f} {auto:>6} {new:7.1f} {old / new:5.2f} | "
              + " ".join(f"{f:7.1f}" for f in fixed) + f" | {best_s:>6} | {e_old:6.1f} {e_new:6.1f}")


if __name__ == "__main__":
    main()
