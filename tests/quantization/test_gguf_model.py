"""GGUF models kept quantized (``quantization="gguf"``, the default for .gguf files).

A tiny two-layer Llama is written with ``gguf.GGUFWriter`` at test time, every block type in
some projection (fused q/k/v of three types, so the layer runs in segments), plus F16 and F32
tensors. The quantized engine must produce the greedy tokens and logprobs of the same file
dequantized at load (``quantization="none"``, itself checked against transformers elsewhere).
Tensor-parallel sharding of the blocks is checked layer by layer against the dequantized slices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aphrodite import LLM, SamplingParams
from aphrodite.distributed.parallel_state import set_tensor_model_parallel
from aphrodite.engine_args import EngineArgs
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from aphrodite.modeling.layers.quantization.gguf import GGUFConfig

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, N_HEAD, N_KV, HEAD_DIM, VOCAB = 256, 512, 4, 2, 64, 96
# Per layer: the GGUF type of each projection (q/k/v differ: the fused layer runs in 3 segments).
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0",
     "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q2_K"},
    {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q5_1", "attn_output": "Q4_1",
     "ffn_gate": "Q3_K", "ffn_up": "F16", "ffn_down": "Q6_K"},
]
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _blocks(rng: np.random.Generator, name: str, rows: int, k: int, scale: float) -> np.ndarray:
    qk, bb = gguf.GGML_QUANT_SIZES[Q[name]]
    raw = rng.integers(0, 256, size=(rows, k // qk, bb), dtype=np.uint8)
    for off in HALF_FIELDS[name]:
        halves = (np.abs(rng.standard_normal((rows, k // qk))) * scale).astype(np.float16)
        raw[:, :, off:off + 2] = halves.view(np.uint8).reshape(rows, k // qk, 2)
    return raw.reshape(rows, -1)


def _tensor(rng: np.random.Generator, name: str, rows: int, k: int, scale: float = 0.01) -> tuple:
    if name == "F16":
        return (rng.standard_normal((rows, k)) * scale * 4).astype(np.float16), None
    return _blocks(rng, name, rows, k, scale), Q[name]


def write_tiny_gguf(path: Path, embed_type: str = "Q6_K", head_type: str | None = "Q8_0",
                    layer_types: list[dict[str, str]] | None = None) -> Path:
    """A Llama GGUF of ``len(layer_types)`` layers (default ``LAYER_TYPES``); ``head_type=None`` ties the
    LM head to the embedding."""
    layer_types = LAYER_TYPES if layer_types is None else layer_types
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_block_count(len(layer_types))
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors: dict[str, tuple] = {"token_embd.weight": _tensor(rng, embed_type, VOCAB, HIDDEN, 0.05)}
    shapes = {"attn_q": (N_HEAD * HEAD_DIM, HIDDEN), "attn_k": (N_KV * HEAD_DIM, HIDDEN),
              "attn_v": (N_KV * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, N_HEAD * HEAD_DIM),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    for i, types in enumerate(layer_types):
        for key, qtype in types.items():
            tensors[f"blk.{i}.{key}.weight"] = _tensor(rng, qtype, *shapes[key])
        tensors[f"blk.{i}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), None
        tensors[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), None
    tensors["output_norm.weight"] = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), None
    if head_type is not None:
        tensors["output.weight"] = _tensor(rng, head_type, VOCAB, HIDDEN, 0.05)
    for name, (data, qtype) in tensors.items():
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


PROMPTS = [[1, 5, 9, 33, 70], [1, 80, 3], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55]]


def _run(path: Path, quantization: str, dtype: str = "float32") -> list:
    llm = LLM(str(path), device="cpu", dtype=dtype, skip_tokenizer_init=True, max_model_len=128,
              quantization=quantization)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1,
                        detokenize=False)
    return llm.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False)


@pytest.mark.parametrize("head_type", ["Q8_0", None])
def test_tiny_quantized_gguf_equals_dequantized(tmp_path: Path, head_type: str | None):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", head_type=head_type)
    kept = _run(path, "gguf")
    deq = _run(path, "none")
    for a, b in zip(kept, deq, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pos in range(1, len(a.prompt_token_ids)):
            tid = a.prompt_token_ids[pos]
            ref = b.prompt_logprobs[pos][tid].logprob
            assert abs(a.prompt_logprobs[pos][tid].logprob - ref) < 1e-4 * max(1.0, abs(ref))
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for tid, lp in lb.items():
                if tid in la:
                    assert abs(la[tid].logprob - lp.logprob) < 1e-4 * max(1.0, abs(lp.logprob))


def test_quantized_model_holds_blocks(tmp_path: Path):
    from aphrodite.config import create_engine_config
    from aphrodite.modeling.loader import load_model
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = create_engine_config(EngineArgs(model=str(path), device="cpu", dtype="float32", skip_tokenizer_init=True))
    assert cfg.model.quantization == "gguf"
    model = load_model(cfg.model, torch.device("cpu"))
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert [s.qtype for s in qkv.gguf_segments] == [Q.Q4_K, Q.Q5_K, Q.Q6_K]
    assert qkv.qweight.dtype == torch.uint8 and qkv.qweight_type.tolist() == [Q.Q4_K, Q.Q5_K, Q.Q6_K]
    gate_up = model.model.layers[0].mlp.gate_up_proj
    assert len(gate_up.gguf_segments) == 1   # one type: one kernel call
    assert [s.qtype for s in model.model.layers[1].mlp.gate_up_proj.gguf_segments] == [Q.Q3_K, 0]
    assert model.model.embed_tokens.gguf_segments[0].qtype == Q.Q6_K
    assert not any(p.dtype.is_floating_point and p.dim() == 2 for p in model.parameters())


def test_quantization_choices_for_gguf(tmp_path: Path):
    from aphrodite.config import create_engine_config
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    args = dict(model=str(path), device="cpu", skip_tokenizer_init=True)
    assert create_engine_config(EngineArgs(**args, quantization="none")).model.quantization is None
    with pytest.raises(ValueError, match="'gguf'.*'none'"):
        create_engine_config(EngineArgs(**args, quantization="awq"))


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 accumulation against float64: relative to the output's scale."""
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.fixture
def tp_rank():
    yield lambda rank: set_tensor_model_parallel(rank, 2)
    set_tensor_model_parallel(0, 1)


def _load(layer, name: str, raw: np.ndarray, qtype: int, shard_id=None) -> None:
    params = dict(layer.named_parameters())
    params["qweight_type"].weight_loader(params["qweight_type"], torch.tensor(qtype), shard_id)
    params["qweight"].weight_loader(params["qweight"], torch.from_numpy(raw), shard_id)


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_shards_on_block_boundaries(tp_rank, rank):
    """Column-parallel layers take whole rows, row-parallel layers whole blocks of each row."""
    tp_rank(rank)
    rng = np.random.default_rng(rank)
    cfg = GGUFConfig()
    x_full = torch.randn(3, 2 * HIDDEN, dtype=torch.float64)
    # Row-parallel: K = 1024 split in two 512-value halves (two Q4_K super-blocks each).
    down = RowParallelLinear(1024, 64, quant_config=cfg, prefix="down")
    raw = _blocks(rng, "Q4_K", 64, 1024, 0.01)
    _load(down, "down", raw, Q.Q4_K)
    w = torch.from_numpy(dequantize(raw, Q.Q4_K)).double()
    x = x_full[:, :512].float()
    ref = x.double() @ w[:, rank * 512:(rank + 1) * 512].T
    _close(down.quant_method.apply(down, x), ref)
    # Merged column-parallel: each rank takes its half of gate's rows and of up's rows.
    gate_up = MergedColumnParallelLinear(HIDDEN, [128, 128], quant_config=cfg, prefix="gate_up")
    gate, up = _blocks(rng, "Q8_0", 128, HIDDEN, 0.01), _blocks(rng, "Q6_K", 128, HIDDEN, 0.01)
    _load(gate_up, "gate_up", gate, Q.Q8_0, 0)
    _load(gate_up, "gate_up", up, Q.Q6_K, 1)
    wg = torch.from_numpy(dequantize(gate, Q.Q8_0)).double()[rank * 64:(rank + 1) * 64]
    wu = torch.from_numpy(dequantize(up, Q.Q6_K)).double()[rank * 64:(rank + 1) * 64]
    x = x_full[:, :HIDDEN].float()
    _close(gate_up.quant_method.apply(gate_up, x), x.double() @ torch.cat([wg, wu]).T)
    # QKV with 2 KV heads on 2 ranks: one KV head each.
    qkv = QKVParallelLinear(HIDDEN, 32, 4, 2, quant_config=cfg, prefix="qkv")
    parts = {"q": (_blocks(rng, "Q4_0", 128, HIDDEN, 0.01), Q.Q4_0),
             "k": (_blocks(rng, "Q4_0", 64, HIDDEN, 0.01), Q.Q4_0),
             "v": (_blocks(rng, "Q5_1", 64, HIDDEN, 0.01), Q.Q5_1)}
    for sid, (raw, qtype) in parts.items():
        _load(qkv, "qkv", raw, qtype, sid)
    ws = [torch.from_numpy(dequantize(raw, qtype)).double() for raw, qtype in parts.values()]
    expect = torch.cat([ws[0][rank * 64:(rank + 1) * 64], ws[1][rank * 32:(rank + 1) * 32],
                        ws[2][rank * 32:(rank + 1) * 32]])
    assert len(qkv.gguf_segments) == 2   # q and k share Q4_0
    _close(qkv.quant_method.apply(qkv, x), x.double() @ expect.T)
