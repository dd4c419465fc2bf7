"""Every supported family against Hugging Face transformers, on a tiny random config built at test time.

One module, parametrized over the families: logits through the paged KV cache (chunked prefill, then
decode) equal HF's; greedy generation through the engine equals HF ``generate`` for a batch of
mixed-length prompts; families with a sliding window get prompts longer than the window, chunked
prefill and a prefix-cache hit.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from aphrodite import LLM, SamplingParams
from aphrodite.benchmarks.tiny_families import FAMILIES, SLIDING, WINDOW, make_hf_model
from aphrodite.modeling.layers.attention import Attention
from tests.modeling.test_llama import check_prefill_then_decode, from_hf, hf_logits


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The HF model of one family and its checkpoint saved as HF does (per-expert tensor names)."""
    name = request.param
    model = make_hf_model(name)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return {"name": name, "hf": model, "path": str(path)}


def test_logits_match_hf_through_the_paged_cache(family: dict[str, Any]) -> None:
    hf_model = family["hf"]
    model = from_hf(hf_model)
    ids = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf_model, ids)
    assert reference.std() > 0.3   # logits large enough that ATOL is a real check
    check_prefill_then_decode(model, reference, ids, prompt_len=29)
    windows = {m.sliding_window for m in model.modules() if isinstance(m, Attention)}
    assert windows == ({WINDOW} if family["name"] in {"mistral", "mixtral", "phi3"} else
                       {WINDOW, None} if family["name"] in SLIDING else {None})


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def assert_hf_greedy(hf_model: torch.nn.Module, prompt: list[int], generated: list[int]) -> None:
    """``generated`` is HF's greedy continuation of ``prompt``: each token is the argmax of HF's logits
    after the tokens before it (one HF forward over the whole sequence instead of a generate loop)."""
    ids = torch.tensor(prompt + generated[:-1])
    expected = hf_logits(hf_model, ids)[len(prompt) - 1:].argmax(-1).tolist()
    assert generated == expected


def test_engine_greedy_matches_hf(family: dict[str, Any]) -> None:
    """A batch of mixed-length prompts (each longer than a sliding window) through ``LLM``, with chunked
    prefill (16-token budget), 8-token blocks, the prefix cache and async scheduling (the next step scheduled
    before this one's tokens are known): each equals HF's greedy generation alone.
    A second request sharing a prompt prefix hits the cache and still matches."""
    llm = LLM(family["path"], device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              block_size=8, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=True,
              num_gpu_blocks_override=64, async_scheduling=True)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (5, 29, 17)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(24), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        assert_hf_greedy(family["hf"], p, list(out.outputs[0].token_ids))
    kv = llm.llm_engine.kv_cache
    hits = kv.prefix_hits
    again = prompts[1][:24] + [7, 8, 9, 10, 11]
    out = llm.generate({"prompt_token_ids": again}, greedy(24), use_tqdm=False)[0]
    assert kv.prefix_hits > hits
    assert_hf_greedy(family["hf"], again, list(out.outputs[0].token_ids))
    assert kv.num_free_blocks == kv.num_blocks   # every block back in the pool (window-freed ones once)


def test_moe_tensor_parallel_2_ranks_match_hf(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Qwen2-MoE on 2 ranks (gloo): experts split along their intermediate dimension, the shared expert
    and a dense layer split as usual, one all-reduce per MoE block: the same logits as HF."""
    import torch.multiprocessing as mp

    from tests.modeling.test_llama import ATOL, _tp_worker
    hf_model = make_hf_model("qwen2_moe")
    path = tmp_path_factory.mktemp("qwen2_moe_tp")
    hf_model.save_pretrained(path)
    out = path / "logits.pt"
    procs = [mp.get_context("spawn").Process(target=_tp_worker, args=(r, str(path), str(path / "rdv"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    errors = "\n".join(f.read_text() for f in sorted(path.glob("*.err")))
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    torch.testing.assert_close(torch.load(out), hf_logits(hf_model, torch.arange(3, 23)), atol=ATOL, rtol=0)
