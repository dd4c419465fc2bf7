"""The vectorized sampler against per-row float64 references written with plain numpy."""
import types

import numpy as np
import pytest
import torch

from aphrodite.engine.request import Request
from aphrodite.modeling.layers.sampler import Sampler
from aphrodite.sampling_params import SamplingParams
from aphrodite.worker.sampling_inputs import build_sampling_metadata

V = 50


@pytest.fixture(autouse=True, params=["c-kernel", "pytorch"])
def draw_path(request, monkeypatch):
    """Every test runs the CPU's C draw and the PyTorch draw the GPU uses."""
    if request.param == "pytorch":
        import aphrodite.modeling.layers.samplers.chain as sampler_module
        monkeypatch.setattr(sampler_module, "cpu_ops", types.SimpleNamespace(available=lambda dtype: False))


def rows(params_list, seeds=None, prompt=(1, 2, 3), outputs=()):
    reqs = []
    for i, p in enumerate(params_list):
        r = Request(str(i), list(prompt), p, seeds[i] if seeds else i, eos_token_ids=(0,))
        r.all_token_ids.extend(outputs)
        reqs.append(r)
    return reqs


def draw(logits, params_list, seeds=None, **kw):
    reqs = rows(params_list, seeds, **kw)
    md = build_sampling_metadata(reqs, logits.shape[1], torch.device("cpu"))
    return Sampler()(logits, md).token_ids.numpy()


def allowed_set(logit_row, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """Tokens a correct sampler may return, computed independently in float64."""
    x = logit_row.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, dtype=bool)
    k = len(x) if top_k < 1 else top_k
    p = np.exp(x[order] - x[order].max())
    p /= p[:k].sum()
    mass = 0.0
    for rank, tok in enumerate(order[:k]):
        if mass < top_p - 1e-9 or rank == 0:
            keep[tok] = True
        mass += p[rank]
    probs = np.exp(x - x.max())
    probs[~keep] = 0
    probs /= probs.sum()
    keep &= probs >= probs.max() * min_p - 1e-12
    return keep


def test_greedy_is_argmax():
    logits = torch.randn(8, V)
    out = draw(logits, [SamplingParams(temperature=0.0)] * 8)
    assert (out == logits.argmax(-1).numpy()).all()


def test_filters_never_sample_excluded_tokens():
    torch.manual_seed(0)
    base = torch.randn(V) * 3
    n = 3000
    logits = base.repeat(n, 1)
    for kw in [dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=10, top_p=0.8, min_p=0.05),
               dict(temperature=0.5, top_p=0.9)]:
        p = SamplingParams(seed=None, **kw)
        out = draw(logits, [p] * n, seeds=list(range(n)))
        ok = allowed_set(base.numpy(), **kw)
        assert ok[out].all(), kw
        # All allowed tokens with noticeable mass show up.
        assert len(set(out.tolist())) >= min(ok.sum(), 3)


def test_frequencies_match_probabilities():
    torch.manual_seed(1)
    base = torch.randn(8)
    n = 20000
    out = draw(base.repeat(n, 1), [SamplingParams(temperature=1.0)] * n, seeds=list(range(n)))
    freq = np.bincount(out, minlength=8) / n
    probs = torch.softmax(base.double(), -1).numpy()
    assert np.abs(freq - probs).max() < 0.015


def test_seed_gives_same_token_whatever_the_batch():
    torch.manual_seed(2)
    row = torch.randn(V)
    p = SamplingParams(temperature=1.0)
    alone = draw(row[None], [p], seeds=[1234])[0]
    others = torch.randn(7, V)
    batch = torch.cat([others[:3], row[None], others[3:]])
    mixed = draw(batch, [SamplingParams(temperature=0.7, top_k=3)] * 3 + [p] + [SamplingParams(temperature=0)] * 4,
                 seeds=[1, 2, 3, 1234, 5, 6, 7, 8])
    assert mixed[3] == alone


def test_penalties_match_reference():
    torch.manual_seed(3)
    logits = torch.randn(1, V)
    prompt, outs = [1, 2, 3], [3, 4, 4, 5]
    p = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    reqs = rows([p], prompt=prompt, outputs=outs)
    md = build_sampling_metadata(reqs, V, torch.device("cpu"))
    from aphrodite.modeling.layers.samplers.repetition import apply_penalties
    got = apply_penalties(logits.clone(), md.penalties)[0].numpy()
    ref = logits[0].numpy().astype(np.float64).copy()
    for t in set(prompt + outs):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(outs):
        ref[t] -= 0.4 * outs.count(t) + 0.2
    assert np.allclose(got, ref, atol=1e-5)


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 0] = 100.0     # eos
    logits[0, 7] = 50.0      # a stop token id
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])
    assert draw(logits, [p])[0] not in (0, 7)
    assert draw(logits, [p], outputs=[5, 5])[0] == 0


def test_logprobs_and_ranks_match_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    reqs = rows([SamplingParams(temperature=1.0, logprobs=4)] * 3)
    md = build_sampling_metadata(reqs, V, torch.device("cpu"))
    out = Sampler()(logits, md)
    ref = torch.log_softmax(logits.double(), -1)
    for i in range(3):
        t = int(out.token_ids[i])
        assert abs(out.logprobs[i].item() - ref[i, t].item()) < 1e-5
        assert out.ranks[i].item() == int((ref[i] > ref[i, t]).sum()) + 1
        assert out.top_ids[i].tolist() == ref[i].topk(4).indices.tolist()
