"""The fused temperature + min-p draw (``sample_temperature_min_p``) on both of its paths, one program per row and
the split vocabulary of small batches (block maxima, block kept masses, then a scan of the one block the target
falls in), against a float64 NumPy inverse-CDF draw and against the float32 PyTorch reference. Rows whose target
lies within float32 summation error of a cumulative boundary may go either way against those; they are counted,
and must be rare. The two paths add the same numbers in the same order, so they must agree on every row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aphrodite.kernels import sampling as ks
from aphrodite.kernels.triton_utils import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
R, V = 48, 300
EDGE = 1e-6          # |target - boundary| / Z under which float32 and float64 may disagree


def draw64(x: np.ndarray, t: np.ndarray, mp: np.ndarray | None, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token, distance of the target to its nearest cumulative boundary / Z) per row, in float64: greedy (first
    argmax) at temperature <= 0 or when the target passes no token (u = 1), else the first token whose running
    mass of exp((x - max) / T), where min-p keeps it, exceeds u * Z."""
    toks, edge = [], []
    for i, row in enumerate(x.astype(np.float64)):
        greedy = int(np.argmax(row))
        if t[i] <= 0:
            toks.append(greedy)
            edge.append(np.inf)
            continue
        s = (row - row.max()) / t[i]
        keep = s >= (np.log(mp[i]) if mp is not None and mp[i] > 0 else -np.inf)
        c = np.cumsum(np.where(keep, np.exp(s), 0.0))
        target = u[i] * c[-1]
        j = int(np.searchsorted(c, target, side="right"))
        toks.append(j if j < V else greedy)
        lo, hi = (c[j - 1] if j else 0.0), (c[j] if j < V else c[-1])
        edge.append(min(target - lo, hi - target) / c[-1] if 0 < u[i] < 1 else np.inf)
    return np.array(toks), np.array(edge)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rows with the cases that matter: greedy rows, ties (values on a 0.5 grid, a max repeated in two
    chunks and twice in one), the max in the last, partial chunk, u = 0 (the first kept token) and u = 1 (no
    token passes: greedy), min-p keeping one token or most of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g) * 3
    x[:12] = (x[:12] * 2).round() / 2
    x[0, 5] = x[0, 250] = 20.0
    x[1, 70] = x[1, 75] = 20.0
    x[2, V - 3] = 20.0
    t = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.5, 3.0]).repeat(R // 6)[torch.randperm(R, generator=g)]
    t[:3] = 0.0
    t[3:6] = 1.0
    mp = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.9, 0.02]).repeat(R // 6)[torch.randperm(R, generator=g)]
    u = torch.rand(R, dtype=torch.float64, generator=g)
    u[3], u[4] = 0.0, 1.0
    return x, t, mp, u


@pytest.mark.parametrize("block", [32, 64])
def test_split_path_matches_float64_draw_and_one_program_per_row(block, device):
    x, t, mp, u = batch(block)
    for m in (mp, None):
        want, edge = draw64(x.numpy(), t.numpy(), None if m is None else m.numpy(), u.numpy())
        clear = edge > EDGE
        assert clear.sum() >= R - 2
        args = (x.to(device), t.to(device), None if m is None else m.to(device), u.to(device))
        split = ks.sample_temperature_min_p(*args, block=block, split=True).cpu().numpy()
        whole = ks.sample_temperature_min_p(*args, block=block, split=False).cpu().numpy()
        ref = ks.sample_temperature_min_p_ref(x, t, m, u).numpy()
        assert (split == whole).all(), np.where(split != whole)
        assert (split[clear] == want[clear]).all(), np.where(split != want)
        assert (split[clear] == ref[clear]).all()
        assert split[0] == 5 and split[1] == 70 and split[2] == V - 3       # first argmax across and within blocks
        if m is not None:
            kept = (x - x.max(1, keepdim=True).values) / torch.where(t > 0, t, 1)[:, None] >= mp.log()[:, None]
            assert kept[torch.arange(R), torch.from_numpy(split)].all()      # never a token min-p removed


def test_a_row_draws_the_same_alone_and_in_a_large_batch(device, monkeypatch):
    """A seeded request's token does not depend on the batch: alone its row takes the split path, in a batch over
    SPLIT_MAX_ROWS one program per row; the same blocks are summed in the same order, so the tokens are equal."""
    monkeypatch.setattr(ks, "SPLIT_MAX_ROWS", 4)
    x, t, mp, u = (a[:10].to(device) for a in batch(7))
    together = ks.sample_temperature_min_p(x, t, mp, u, block=32).tolist()
    assert together == [ks.sample_temperature_min_p(x[i:i + 1], t[i:i + 1], mp[i:i + 1], u[i:i + 1], block=32).item()
                        for i in range(10)]
