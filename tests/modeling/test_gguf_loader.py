"""The GGUF loader against transformers' GGUF loading, and on small files written here."""
from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from aphrodite.modeling.loader.gguf_loader import (
    SUPPORTED_GGUF_ARCHITECTURES,
    gguf_architecture,
    iterate_gguf_weights,
    read_gguf_metadata,
)


def test_default_model_matches_transformers(default_gguf_path: str, default_gguf_hf_config: Any,
                                            default_gguf_hf_state_dict: dict[str, torch.Tensor]) -> None:
    ours = dict(iterate_gguf_weights(default_gguf_path, default_gguf_hf_config))
    reference = default_gguf_hf_state_dict

    assert default_gguf_hf_config.tie_word_embeddings
    assert set(reference) - set(ours) == {"lm_head.weight"}  # tied: the file has no output tensor
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        ref = reference[name]
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == ref.shape, name
        assert tensor.is_contiguous(), name
        if not torch.equal(tensor, ref):  # exact is expected; the brief allows 1e-6
            torch.testing.assert_close(tensor, ref, atol=1e-6, rtol=0, msg=name)
    assert len(ours) == 272


def test_weights_are_streamed(default_gguf_path: str, default_gguf_hf_config: Any) -> None:
    weights = iterate_gguf_weights(default_gguf_path, default_gguf_hf_config)
    assert inspect.isgenerator(weights)
    name, tensor = next(weights)
    assert name == "model.embed_tokens.weight" and tensor.shape == (49152, 576)
    weights.close()


def test_default_model_metadata(default_gguf_path: str) -> None:
    assert gguf_architecture(default_gguf_path) == "llama"
    keys = {"llama.block_count", "llama.rope.freq_base", "tokenizer.chat_template",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "general.languages", "no.such.key"}
    ours = read_gguf_metadata(default_gguf_path, keys)
    from transformers.integrations.gguf import read_gguf_metadata as transformers_read_gguf_metadata
    theirs, _ = transformers_read_gguf_metadata(default_gguf_path, string_arrays=("general.languages",))
    assert set(ours) == keys - {"no.such.key"}
    for key, value in ours.items():
        assert value == pytest.approx(theirs[key]) if isinstance(value, float) else value == theirs[key], key
    assert ours["general.languages"] == ["en"] and ours["tokenizer.ggml.eos_token_id"] == 2


# --- small files written with gguf.GGUFWriter ---------------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert script does to Q/K rows (the operation the loader must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, arch: str, tensors: dict[str, Any]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for name, value in tensors.items():
        if isinstance(value, tuple):  # (quantized bytes, float shape, type)
            data, shape, qtype = value
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama(tmp_path: Path, untied: bool = True) -> tuple[Path, dict[str, np.ndarray], Any]:
    rng = np.random.default_rng(0)
    hidden, n_head, n_kv, head_dim, inter, vocab = 64, 4, 2, 16, 96, 40
    config = SimpleNamespace(num_attention_heads=n_head, num_key_value_heads=n_kv, num_hidden_layers=1)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((n_head * head_dim, hidden), dtype=np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((n_kv * head_dim, hidden), dtype=np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((n_kv * head_dim, hidden), dtype=np.float32),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, hidden), dtype=np.float32),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((inter, hidden), dtype=np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((inter, hidden), dtype=np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, inter), dtype=np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hidden, dtype=np.float32),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(hidden, dtype=np.float32),
        "model.norm.weight": rng.standard_normal(hidden, dtype=np.float32),
    }
    if untied:
        hf["lm_head.weight"] = rng.standard_normal((vocab, hidden), dtype=np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    up_q8 = gguf.quants.quantize(hf["model.layers.0.mlp.up_proj.weight"], q8)
    tensors: dict[str, Any] = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "blk.0.attn_q.weight": _llama_cpp_permute(hf["model.layers.0.self_attn.q_proj.weight"], n_head),
        "blk.0.attn_k.weight": _llama_cpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], n_kv),
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"].astype(np.float16),
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": (up_q8, hf["model.layers.0.mlp.up_proj.weight"].shape, q8),
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "rope_freqs.weight": np.ones(head_dim // 2, dtype=np.float32),  # ignored: HF derives it
    }
    if untied:
        tensors["output.weight"] = hf["lm_head.weight"]
    # What the loader should give back for the lossy tensors.
    hf["model.layers.0.self_attn.o_proj.weight"] = hf["model.layers.0.self_attn.o_proj.weight"].astype(
        np.float16).astype(np.float32)
    hf["model.layers.0.mlp.up_proj.weight"] = gguf.quants.dequantize(up_q8, q8)
    return _write_gguf(tmp_path / "tiny.gguf", "llama", tensors), hf, config


@pytest.mark.parametrize("untied", [True, False])
def test_tiny_llama_names_and_qk_unpermute(tmp_path: Path, untied: bool) -> None:
    path, expected, config = _tiny_llama(tmp_path, untied)
    ours = dict(iterate_gguf_weights(str(path), config))
    assert set(ours) == set(expected)
    assert ("lm_head.weight" in ours) == untied
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)
    assert gguf_architecture(str(path)) == "llama"


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    assert gguf_architecture(str(path)) == "mamba"
    assert "mamba" not in SUPPORTED_GGUF_ARCHITECTURES
    config = SimpleNamespace(num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)
    with pytest.raises(ValueError, match="mamba"):
        next(iterate_gguf_weights(str(path), config))


def test_unknown_tensor_fails_before_yielding(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "odd.gguf", "llama", {
        "token_embd.weight": np.zeros((4, 8), np.float32),
        "blk.0.attn_qkv.weight": np.zeros((24, 8), np.float32),
    })
    config = SimpleNamespace(num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)
    with pytest.raises(ValueError, match="attn_qkv"):
        next(iterate_gguf_weights(str(path), config))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_architecture(str(path))


def test_lazy_blocks_dequantize_only_their_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor-parallel shard (a block of rows and columns) equals the same block of the whole
    tensor, through the Q/K un-permutation and a Q8_0 matrix; the whole is never dequantized."""
    path, expected, config = _tiny_llama(tmp_path)
    rows_dequantized: list[int] = []
    real_dequantize = gguf.quants.dequantize

    def recording_dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
        out = real_dequantize(data, qtype)
        rows_dequantized.append(out.shape[0] if out.ndim > 1 else -1)
        return out
    monkeypatch.setattr(gguf.quants, "dequantize", recording_dequantize)
    for name, lazy in iterate_gguf_weights(str(path), config):
        full = expected[name]
        assert tuple(lazy.shape) == full.shape, name
        if full.ndim == 1:
            np.testing.assert_array_equal(lazy[5:9].numpy(), full[5:9], err_msg=name)
            continue
        half = full.shape[0] // 2
        block = lazy.narrow(0, half, half).narrow(1, 32, 32)
        assert tuple(block.shape) == (half, 32)
        np.testing.assert_array_equal(block.materialize().numpy(), full[half:, 32:64], err_msg=name)
        rows_dequantized.clear()
        _, rest = lazy.split([half // 2, full.shape[0] - half // 2])
        np.testing.assert_array_equal(rest.materialize().numpy(), full[half // 2:], err_msg=name)
        assert rows_dequantized == [full.shape[0] - half // 2], name
