"""``--kv-cache-dtype fp8``: e4m3 storage of ``k / k_scale`` and ``v / v_scale`` in the paged cache.

The Triton kernels (interpreted on the CPU) against a float64 attention over the fp8-rounded truth (what the
cache can hold: tight tolerance) and over the exact truth (fp8's own error: loose); the PyTorch backend the
same way; then an engine run whose cache is fp8 and whose greedy tokens follow transformers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from aphrodite.kernels.paged_attention import (
    DecodeAppend,
    TritonAttentionBackend,
    paged_attention,
    paged_attention_ref,
    reshape_and_cache,
)
from aphrodite.kernels.rope_cache import rope_and_cache, rope_and_cache_ref
from aphrodite.modeling.layers.attention import TorchAttentionBackend
from tests.kernels.test_kernel_paged_attention import MIXED, dense_attention, make_case
from tests.kernels.test_kernel_rope_cache import cos_sin, decode_batch

FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.5, 2.0


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(FP8)


def _rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _fp8(x, scale).double() * scale


def fp8_case(seed: int = 0, **kw):
    """MIXED with the cached prefix stored as fp8; also the truth rounded through fp8 (what it can hold)."""
    case = make_case(**{**MIXED, **kw}, num_kv_heads=2, head_dim=64, page=16, dtype=torch.float32,
                     device=torch.device("cpu"), seed=seed)
    fp8 = dataclasses.replace(case, k_cache=_fp8(case.k_cache, K_SCALE), v_cache=_fp8(case.v_cache, V_SCALE))
    rounded = dataclasses.replace(case, keys=[_rounded(k, K_SCALE) for k in case.keys],
                                  vals=[_rounded(v, V_SCALE) for v in case.vals])
    return fp8, rounded, case


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_triton_fp8_cache_mixed_batch(group, num_splits):
    case, rounded, exact = fp8_case(group=group)
    m = case.meta
    reshape_and_cache(case.k_new, case.v_new, case.k_cache, case.v_cache, m.slot_mapping, K_SCALE, V_SCALE)
    assert case.k_cache.dtype == FP8
    out = torch.full_like(case.q, float("nan"))
    paged_attention(case.q, case.k_cache, case.v_cache, out, m.query_start_loc, m.seq_lens, m.block_tables,
                    0.125, m.max_query_len, m.max_seq_len, num_decodes=m.num_decodes,
                    max_decode_seq_len=m.max_decode_seq_len, num_splits=num_splits, solo_tiles=0,
                    k_scale=K_SCALE, v_scale=V_SCALE)
    n = case.num_real_tokens
    assert not torch.isnan(out[:n]).any()
    torch.testing.assert_close(out[:n].double(), dense_attention(rounded, 0.125), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out[:n].double(), dense_attention(exact, 0.125), rtol=0, atol=0.15)


def test_backends_agree_on_fp8_cache():
    """Triton and PyTorch backends write the same fp8 bytes and give the same attention."""
    case, _, exact = fp8_case(poison=1.0e4, group=2)
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    ref = TorchAttentionBackend.forward(case.q, case.k_new, case.v_new, kc, vc, case.meta, 0.125,
                                        k_scale=K_SCALE, v_scale=V_SCALE)
    out = TritonAttentionBackend.forward(case.q, case.k_new, case.v_new, case.k_cache, case.v_cache, case.meta,
                                         0.125, k_scale=K_SCALE, v_scale=V_SCALE)
    n = case.num_real_tokens
    assert torch.equal(case.k_cache.view(torch.uint8), kc.view(torch.uint8))
    assert torch.equal(case.v_cache.view(torch.uint8), vc.view(torch.uint8))
    torch.testing.assert_close(out[:n].double(), ref[:n].double(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(ref[:n].double(), dense_attention(exact, 0.125), rtol=0, atol=0.15)


def test_rope_and_cache_fp8():
    gen = torch.Generator().manual_seed(1)
    t, hkv, d, page, blocks = 7, 2, 64, 16, 6
    q = torch.randn(t, 4, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen)
    v = torch.randn(t, hkv, d, generator=gen)
    pos = torch.randint(0, 500, (t,), generator=gen)
    slots = torch.randperm(blocks * page, generator=gen)[:t]
    table = cos_sin(d, torch.device("cpu"), torch.float32)
    kc = torch.zeros(blocks, page, hkv, d, dtype=FP8)
    vc = torch.zeros_like(kc)
    kr, vr = kc.clone(), vc.clone()
    q2, k2 = q.clone(), k.clone()
    rope_and_cache_ref(pos, q2, k2, v, kr, vr, slots, table, K_SCALE, V_SCALE)
    rope_and_cache(pos, q, k, v, kc, vc, slots, table, K_SCALE, V_SCALE)
    torch.testing.assert_close(kc.float(), kr.float(), rtol=0, atol=0)
    torch.testing.assert_close(vc.float(), vr.float(), rtol=0, atol=0)
    flat = kc.view(-1, hkv, d)[slots].double() * K_SCALE
    torch.testing.assert_close(flat, k2.double(), rtol=2**-4, atol=2**-9 * K_SCALE)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_append_fp8(num_splits):
    """The one-launch decode (rotate, append to the cache, attend) on an fp8 cache vs the reference."""
    bt = decode_batch([150, 6, -1, 63], hkv=2, group=4, d=64, page=16, dtype=torch.float32,
                      device=torch.device("cpu"))
    kc, vc = _fp8(bt["kc"], K_SCALE), _fp8(bt["vc"], V_SCALE)
    table = cos_sin(64, torch.device("cpu"), torch.float32)
    append = DecodeAppend(bt["pos"], table, bt["k"], bt["v"], bt["slots"])
    args = (bt["qsl"], bt["seq_lens"], bt["tables"], 0.125, 1, bt["max_len"])
    kr, vr = kc.clone(), vc.clone()
    ref = torch.zeros(bt["q"].shape)
    paged_attention_ref(bt["q"], kr, vr, ref, *args, append=append, k_scale=K_SCALE, v_scale=V_SCALE)
    out = torch.full(bt["q"].shape, float("nan"))
    paged_attention(bt["q"], kc, vc, out, *args, num_decodes=4, max_decode_seq_len=bt["max_len"],
                    num_splits=num_splits, append=append, solo_tiles=0, k_scale=K_SCALE, v_scale=V_SCALE)
    assert torch.equal(kc.view(torch.uint8), kr.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vr.view(torch.uint8))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("scales,cpu_path", [(None, "c-kernels"), ((0.25, 0.5), "pytorch"), ((0.25, 0.5), "c-kernels")],
                         ids=["no_scales-c", "checkpoint_scales-pytorch", "checkpoint_scales-c"])
def test_engine_run_with_fp8_cache(tiny_llama_dir, tmp_path, monkeypatch, scales, cpu_path):
    """Greedy tokens equal transformers' (eager attention) with its K/V rounded through fp8 as our cache
    stores them; queries stay exact. ``scales``: per-layer k/v scales saved in the checkpoint
    (``self_attn.k_scale`` / ``v_scale``, as llm-compressor writes them), else 1.0."""
    import shutil

    import transformers.models.llama.modeling_llama as modeling_llama
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from aphrodite import LLM, SamplingParams
    from aphrodite.modeling.layers import attention
    monkeypatch.delenv("TRITON_INTERPRET")
    if cpu_path == "pytorch":
        monkeypatch.setattr(attention, "_fp8_in_c", lambda q, cache: False)
    path = tiny_llama_dir
    ks, vs = scales or (1.0, 1.0)
    if scales is not None:
        path = str(tmp_path / "scaled")
        shutil.copytree(tiny_llama_dir, path)
        tensors = load_file(f"{path}/model.safetensors")
        for i in range(2):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(ks)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(vs)
        save_file(tensors, f"{path}/model.safetensors")
    llm = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              kv_cache_dtype="fp8")
    runner = llm.llm_engine.executor.runner
    assert runner.kv_caches[0][0].dtype == FP8
    assert [(a.k_scale, a.v_scale) for a in runner.attn_layers] == [(ks, vs)] * 2
    if scales is None:
        plain = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128)
        assert runner.kv_bytes_per_block() * 4 == plain.llm_engine.executor.runner.kv_bytes_per_block()
    eager = modeling_llama.eager_attention_forward

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):
        key = (key / ks).to(FP8).to(key.dtype) * ks
        value = (value / vs).to(FP8).to(value.dtype) * vs
        return eager(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", fp8_kv_attention)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    prompts = [[5, 17, 200, 31, 8, 99, 12], list(range(40, 75))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == ref


def test_kv_cache_dtype_is_validated(tiny_llama_dir):
    from aphrodite import LLM
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' is not supported"):
        LLM(tiny_llama_dir, device="cpu", skip_tokenizer_init=True, kv_cache_dtype="int8")


needs_c = pytest.mark.skipif(not __import__("aphrodite.kernels.cpu.ops", fromlist=["available"]).available(
    torch.float32), reason="no C compiler")


@needs_c
def test_c_fp8_codec_matches_torch():
    """Every code decodes as torch decodes it; encoding rounds to nearest even and saturates like torch's
    conversion of the clamped value (ties, subnormals, the top of the range, NaN)."""
    from aphrodite.kernels.cpu import ops
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(FP8).float()
    got = ops.e4m3_to_float(codes)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(want)], want[~torch.isnan(want)])
    grid = want[~torch.isnan(want)]
    mids = (grid[:-1] + grid[1:]) / 2                                  # exact ties, in float32
    x = torch.cat([grid, mids, torch.randn(3000) * 10, torch.rand(500) * 0.03, torch.tensor([500.0, -1e6, 450.0])])
    x = torch.cat([x, torch.tensor([float("nan")])])
    k = x.reshape(-1, 1, 1)
    cache = torch.zeros(k.shape[0], 1, 1, dtype=FP8)
    ops.write_kv_fp8(k, k, cache, cache.clone(), torch.arange(k.shape[0]), 1.0, 1.0)
    ref = x.clamp(-448, 448).to(FP8)
    assert torch.equal(cache.view(-1).view(torch.uint8)[:-1], ref.view(torch.uint8)[:-1])
    assert torch.isnan(cache.view(-1)[-1].float())


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_fp8_decode_attention(dtype):
    """The C decode attention over an fp8 cache vs a float64 attention over the fp8-rounded truth."""
    from aphrodite.kernels.cpu import ops
    case, rounded, _ = fp8_case(q_lens=[1, 1, 1, 1], ctx_lens=[15, 40, 3, 70], group=4)
    m = case.meta
    ops.write_kv_fp8(case.k_new.to(dtype), case.v_new.to(dtype), case.k_cache, case.v_cache, m.slot_mapping,
                     K_SCALE, V_SCALE)
    if dtype == torch.bfloat16:   # the truth the kernel sees: keys and queries rounded to bf16 first
        rounded = dataclasses.replace(rounded, q=case.q.to(dtype))
    out = ops.paged_decode_attention_fp8(case.q.to(dtype), case.k_cache, case.v_cache, m.block_tables, m.seq_lens,
                                         0.125, K_SCALE, V_SCALE)
    want = dense_attention(rounded, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
