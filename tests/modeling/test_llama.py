"""The Llama family against Hugging Face transformers, through the paged KV cache.

Our model runs a prompt the way the engine will (flat tokens, AttentionMetadata, a real
block-paged cache): one prefill, chunked prefill, then decode one token at a time. Every
step's logits must equal HF's full-sequence logits at the same positions.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from aphrodite.config import ModelConfig
from aphrodite.distributed.parallel_state import set_tensor_model_parallel
from aphrodite.modeling.layers.attention import Attention, AttentionMetadata, set_attention_metadata
from aphrodite.modeling.layers.embedding import VocabParallelEmbedding
from aphrodite.modeling.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from aphrodite.modeling.layers.norm import RMSNorm
from aphrodite.modeling.layers.rotary import RopeConfig, get_rope_config
from aphrodite.modeling.loader import load_model
from aphrodite.modeling.models.llama import LlamaForCausalLM
from aphrodite.modeling.models.registry import ARCHITECTURES, get_model_class

BLOCK_SIZE = 16
NUM_BLOCKS = 8
ATOL = 1e-4


# ----------------------------------------------------------------------------- helpers

def model_config(path: Path | str, load_format: str = "safetensors", dtype: torch.dtype = torch.float32,
                 hf_config: object = None) -> ModelConfig:
    path = Path(path)
    hf_config = hf_config or AutoConfig.from_pretrained(path)
    return ModelConfig(model=str(path), path=str(path), hf_config=hf_config, dtype=dtype,
                       max_model_len=hf_config.max_position_embeddings, load_format=load_format,
                       gguf_file=None, tokenizer=str(path), tokenizer_revision=None,
                       skip_tokenizer_init=True, seed=0, max_logprobs=20)


def bind_kv_cache(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """What the engine does: give every Attention layer its own (K, V) block pool."""
    for module in model.modules():
        if isinstance(module, Attention):
            shape = (NUM_BLOCKS, BLOCK_SIZE, module.num_kv_heads, module.head_dim)
            module.kv_cache = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))


def build_metadata(seqs: list[tuple[list[int], int, int]]) -> AttentionMetadata:
    """``seqs``: (block table, cached tokens, new tokens) per sequence, decodes first."""
    num_decodes = 0
    for _, ctx, q in seqs:
        if q != 1 or ctx == 0:
            break
        num_decodes += 1
    starts, lens, slots = [0], [], []
    for table, ctx, q in seqs:
        starts.append(starts[-1] + q)
        lens.append(ctx + q)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx, ctx + q)]
    width = max(len(t) for t, _, _ in seqs)
    tables = [t + [0] * (width - len(t)) for t, _, _ in seqs]
    i32 = torch.int32
    return AttentionMetadata(
        num_decodes=num_decodes, query_start_loc=torch.tensor(starts, dtype=i32),
        seq_lens=torch.tensor(lens, dtype=i32),
        block_tables=torch.tensor(tables, dtype=i32), slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(q for _, _, q in seqs), max_seq_len=max(lens),
        max_decode_seq_len=max(lens[:num_decodes], default=0),
        query_start_loc_cpu=starts, seq_lens_cpu=lens)


def run_step(model: LlamaForCausalLM, tokens: list[torch.Tensor],
             seqs: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """One engine step over several sequences; returns logits for every new token, flat."""
    input_ids = torch.cat(tokens)
    positions = torch.cat([torch.arange(ctx, ctx + q) for _, ctx, q in seqs])
    with torch.inference_mode(), set_attention_metadata(build_metadata(seqs)):
        hidden = model(input_ids, positions)
        return model.compute_logits(hidden)


def hf_logits(hf_model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(ids[None]).logits[0].float()


def check_prefill_then_decode(model: LlamaForCausalLM, reference: torch.Tensor, ids: torch.Tensor,
                              prompt_len: int) -> None:
    """Prefill ``ids[:prompt_len]`` in two chunks, then decode the rest token by token."""
    bind_kv_cache(model)
    table = [3, 5, 1]  # non-contiguous blocks on purpose
    split = prompt_len // 2 + 1
    out = run_step(model, [ids[:split]], [(table, 0, split)])
    out2 = run_step(model, [ids[split:prompt_len]], [(table, split, prompt_len - split)])
    torch.testing.assert_close(torch.cat([out, out2]), reference[:prompt_len], atol=ATOL, rtol=0)
    for pos in range(prompt_len, len(ids)):
        step = run_step(model, [ids[pos:pos + 1]], [(table, pos, 1)])
        torch.testing.assert_close(step[0], reference[pos], atol=ATOL, rtol=0)


def from_hf(hf_model: torch.nn.Module, config: object = None, drop: tuple[str, ...] = ()) -> LlamaForCausalLM:
    cls = get_model_class(hf_model.config.architectures[0] if hf_model.config.architectures
                          else type(hf_model).__name__)
    model = cls(config or hf_model.config)
    loaded = model.load_weights((n, t) for n, t in hf_model.state_dict().items() if n not in drop)
    assert loaded == {n for n, _ in model.named_parameters()}
    return model.eval()


# ----------------------------------------------------------------------------- against HF

@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama_tied_dir"])
def test_safetensors_matches_hf(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import LlamaForCausalLM as HFLlama
    path = request.getfixturevalue(fixture)
    hf_model = HFLlama.from_pretrained(path).float().eval()
    model = load_model(model_config(path), torch.device("cpu"))
    ids = torch.randint(0, hf_model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf_model, ids)
    assert reference.std() > 0.3  # logits large enough that ATOL is a real check
    check_prefill_then_decode(model, reference, ids, prompt_len=29)
    if hf_model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch, overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=24,
                   rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0})),
    ("llama", dict(num_key_value_heads=4, num_hidden_layers=3)),
    ("mistral", dict(sliding_window=None)),
])
def test_config_variants_match_hf(arch: str, overrides: dict, tiny_hf_model_factory) -> None:
    hf_model = tiny_hf_model_factory(arch, **overrides)
    model = from_hf(hf_model)
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(2))
    check_prefill_then_decode(model, hf_logits(hf_model, ids), ids, prompt_len=18)


def test_mixed_batch_matches_hf(tiny_hf_model_factory) -> None:
    """Decodes and a prefill in one flat batch: positions and slots are per sequence."""
    hf_model = tiny_hf_model_factory()
    model = from_hf(hf_model)
    bind_kv_cache(model)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 320, (20,), generator=gen), torch.randint(0, 320, (9,), generator=gen)
    ref_a, ref_b = hf_logits(hf_model, a), hf_logits(hf_model, b)
    run_step(model, [a[:19]], [([0, 2], 0, 19)])
    out = run_step(model, [a[19:], b], [([0, 2], 19, 1), ([4], 0, 9)])
    torch.testing.assert_close(out[0], ref_a[19], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:], ref_b, atol=ATOL, rtol=0)


def test_checkpoint_without_lm_head_ties(tiny_hf_model_factory) -> None:
    """An untied config whose checkpoint has no lm_head (common in GGUF) uses the embedding."""
    hf_model = tiny_hf_model_factory(tie_word_embeddings=True)
    config = type(hf_model.config).from_dict({**hf_model.config.to_dict(), "tie_word_embeddings": False})
    model = from_hf(hf_model, config, drop=("lm_head.weight",))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(1, 13)
    bind_kv_cache(model)
    out = run_step(model, [ids], [([0], 0, 12)])
    torch.testing.assert_close(out, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- loaders

def test_sharded_safetensors_loads_the_same(tiny_llama_dir: str, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM as HFLlama
    HFLlama.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    single = load_model(model_config(tiny_llama_dir), torch.device("cpu"))
    sharded = load_model(model_config(tmp_path), torch.device("cpu"))
    for (name, p), (name2, p2) in zip(single.named_parameters(), sharded.named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, p2), name


def test_dummy_load_from_config_only(tiny_llama_dir: str, tmp_path: Path) -> None:
    shutil.copy(Path(tiny_llama_dir) / "config.json", tmp_path / "config.json")
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(model_config(tmp_path, "dummy", dtype), torch.device("cpu"))
        assert not model.training
        for name, p in model.named_parameters():
            assert p.dtype == dtype and not p.requires_grad, name
            assert p.abs().max() <= 1e-3 and p.abs().max() > 0, name
        bind_kv_cache(model, dtype)
        logits = run_step(model, [torch.arange(10)], [([0], 0, 10)])
        assert logits.shape == (10, 320) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    assert torch.get_default_dtype() == torch.float32  # the loader restored it


def test_missing_safetensors_raises(tiny_llama_dir: str, tmp_path: Path) -> None:
    shutil.copy(Path(tiny_llama_dir) / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(model_config(tmp_path), torch.device("cpu"))


def test_unsupported_architecture_raises(tiny_llama_dir: str) -> None:
    assert set(ARCHITECTURES) >= {"LlamaForCausalLM", "MistralForCausalLM"}
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")
    hf_config = AutoConfig.from_pretrained(tiny_llama_dir)
    hf_config.architectures = ["FalconForCausalLM"]
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        load_model(model_config(tiny_llama_dir, hf_config=hf_config), torch.device("cpu"))


# ----------------------------------------------------------------------------- layers

def test_rope_config_old_and_new_styles() -> None:
    old = SimpleNamespace(rope_theta=5e5, max_position_embeddings=512,
                          rope_scaling={"type": "linear", "factor": 2.0})
    assert get_rope_config(old) == RopeConfig(theta=5e5, rope_type="linear", factor=2.0,
                                              original_max_position_embeddings=512, max_position_embeddings=512)
    assert get_rope_config(SimpleNamespace(rope_theta=1e4, rope_scaling=None)).rope_type == "default"
    new = SimpleNamespace(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
    rope = get_rope_config(new)
    assert (rope.theta, rope.rope_type, rope.original_max_position_embeddings) == (5e5, "llama3", 8192)
    with pytest.raises(ValueError, match="fancy"):
        get_rope_config(SimpleNamespace(rope_parameters={"rope_type": "fancy", "rope_theta": 1e4}))


def test_rmsnorm_fused_residual_matches_hf_in_bf16() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, r = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
    ours, hf = RMSNorm(64, 1e-5).to(torch.bfloat16), LlamaRMSNorm(64, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        hf.weight.copy_(ours.weight)
    out, res = ours(x, r)
    assert torch.equal(res, x + r)
    assert torch.equal(out, hf(x + r))
    assert torch.equal(ours(x), hf(x))


def test_tensor_parallel_weight_loaders_take_rank_slices() -> None:
    """Rank 1 of 2 must hold the second half of each split dimension (KV heads replicated if few)."""
    try:
        set_tensor_model_parallel(1, 2)
        qkv = QKVParallelLinear(8, head_size=2, total_num_heads=4, total_num_kv_heads=1)
        q, k, v = torch.randn(8, 8), torch.randn(2, 8), torch.randn(2, 8)
        for sid, w in zip("qkv", (q, k, v), strict=True):
            qkv.weight.weight_loader(qkv.weight, w, sid)
        assert torch.equal(qkv.weight, torch.cat([q[4:], k, v]))
        merged = MergedColumnParallelLinear(8, [6, 6])
        gate, up = torch.randn(6, 8), torch.randn(6, 8)
        merged.weight.weight_loader(merged.weight, gate, 0)
        merged.weight.weight_loader(merged.weight, up, 1)
        assert torch.equal(merged.weight, torch.cat([gate[3:], up[3:]]))
        row = RowParallelLinear(6, 8, bias=True)
        w, b = torch.randn(8, 6), torch.randn(8)
        row.weight.weight_loader(row.weight, w)
        row.bias.weight_loader(row.bias, b)
        assert torch.equal(row.weight, w[:, 3:]) and torch.equal(row.bias, b)
        emb = VocabParallelEmbedding(7, 4)
        table = torch.randn(7, 4)
        emb.weight.weight_loader(emb.weight, table)
        assert torch.equal(emb.weight[:3], table[4:]) and not emb.weight[3].any()
    finally:
        set_tensor_model_parallel(0, 1)


def _tp_worker(rank: int, path: str, rendezvous: str, out: str) -> None:
    """One rank of a 2-way tensor-parallel run on CPU (gloo): load shards, prefill, save logits.

    A failure is written next to ``out`` so the test can show the child's traceback."""
    import os
    import traceback

    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
        set_tensor_model_parallel(rank, 2)
        model = load_model(model_config(Path(path)), torch.device("cpu"))
        bind_kv_cache(model)
        ids = torch.arange(3, 23)
        logits = torch.cat([run_step(model, [ids[:19]], [([1, 0], 0, 19)]),
                            run_step(model, [ids[19:]], [([1, 0], 19, 1)])])
        if rank == 0:
            torch.save(logits, out)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
        dist.destroy_process_group()
    except BaseException:
        Path(f"{out}.rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Leave without the interpreter's teardown: gloo's background threads occasionally abort
    # it ("terminate called without an active exception", exit -6) after all work is done.
    os._exit(0)


def test_tensor_parallel_2_ranks_match_hf(tiny_llama_tied_dir: str, tmp_path: Path) -> None:
    """Vocab-sharded (tied) embedding, head-split attention, all-reduced rows: same logits as HF."""
    import torch.multiprocessing as mp
    from transformers import LlamaForCausalLM as HFLlama
    ctx = mp.get_context("spawn")
    out = tmp_path / "logits.pt"
    args = (tiny_llama_tied_dir, str(tmp_path / "rdv"), str(out))
    procs = [ctx.Process(target=_tp_worker, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    errors = "\n".join(f.read_text() for f in sorted(tmp_path.glob("*.err")))
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
    hf_model = HFLlama.from_pretrained(tiny_llama_tied_dir).float().eval()
    torch.testing.assert_close(torch.load(out), hf_logits(hf_model, torch.arange(3, 23)), atol=ATOL, rtol=0)
