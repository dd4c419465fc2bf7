"""One linear weight written in each supported checkpoint format, plus the float64 weight it stands for."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.quantization import packing

GROUP = 32
BLOCK = 16

INT4_FORMATS = ("awq", "gptq", "gptq_actorder", "gptq_v2_asym", "ct_w4a16", "ct_w4a16_asym")
FP8_FORMATS = ("fp8_online", "fp8_tensor", "fp8_block", "ct_fp8_channel", "ct_fp8_tensor_static")
FORMATS = INT4_FORMATS + FP8_FORMATS


def quantization_config(fmt: str) -> dict[str, Any] | None:
    """``quantization_config`` as each tool writes it into config.json (None: quantized at load)."""
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    if fmt.startswith("gptq"):
        return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": fmt == "gptq_actorder",
                "sym": not fmt.endswith("asym"), "checkpoint_format": "gptq_v2" if "v2" in fmt else "gptq",
                "static_groups": False, "true_sequential": True, "damp_percent": 0.01}
    if fmt.startswith("ct_w4a16"):
        sym = not fmt.endswith("asym")
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized",
                                              "weights": {"num_bits": 4, "type": "int", "symmetric": sym,
                                                          "strategy": "group", "group_size": GROUP,
                                                          "dynamic": False, "actorder": None}}},
                "ignore": ["lm_head"], "quantization_status": "compressed", "kv_cache_scheme": None}
    if fmt.startswith("ct_fp8"):
        static = fmt.endswith("static")
        strategy = "tensor" if "tensor" in fmt else "channel"
        act = ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
               if static else {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                               "dynamic": True})
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": act,
                                              "output_activations": None, "format": "float-quantized",
                                              "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                          "strategy": strategy, "dynamic": False}}},
                "ignore": ["lm_head"], "quantization_status": "compressed"}
    if fmt == "fp8_tensor":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if fmt == "fp8_block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK, BLOCK]}
    assert fmt == "fp8_online"
    return None


def write_layer(fmt: str, w: torch.Tensor, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(checkpoint tensors of one ``[out, in]`` projection named without prefix, float64 ``[out, in]``).

    The act order comes from ``seed``: projections that share an input (q/k/v, gate/up) share it, as
    GPTQ's activation statistics make them."""
    gen = torch.Generator().manual_seed(seed)
    n, k = w.shape
    if fmt in INT4_FORMATS:
        sym = fmt in ("gptq", "gptq_actorder", "ct_w4a16")
        g_idx = torch.arange(k) // GROUP
        if fmt == "gptq_actorder":
            order = torch.randperm(k, generator=gen)              # activation order of the input columns
            g_idx = torch.empty(k, dtype=torch.long)
            g_idx[order] = torch.arange(k) // GROUP
        codes, scales, zeros = packing.quantize_groups(w, GROUP, sym, g_idx)
        ref = packing.dequant(codes, scales, zeros, g_idx)
        if fmt == "awq":
            return packing.pack_awq(codes, scales, zeros), ref
        if fmt.startswith("gptq"):
            return packing.pack_gptq(codes, scales, zeros, g_idx, v2="v2" in fmt), ref
        return packing.pack_compressed_tensors(codes, scales, zeros, sym), ref
    if fmt == "fp8_online":
        wq, scale = packing.quantize_fp8_channel(w)
        return {"weight": w.float()}, wq.double() * scale.double()[:, None]
    if fmt == "fp8_block":
        wq, scale = packing.quantize_fp8_block(w, BLOCK, BLOCK)
        return {"weight": wq, "weight_scale_inv": scale}, packing.dequant_fp8_block(wq, scale, BLOCK, BLOCK)
    if fmt in ("fp8_tensor", "ct_fp8_tensor_static"):
        scale = (w.double().abs().max() / 448.0).float()
        wq = (w.double() / scale.double()).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors = {"weight": wq, "weight_scale": scale.reshape(1) if fmt.startswith("ct") else scale.reshape(())}
        if fmt == "ct_fp8_tensor_static":
            tensors["input_scale"] = torch.tensor([0.05])
        return tensors, wq.double() * scale.double()
    assert fmt == "ct_fp8_channel"
    wq, scale = packing.quantize_fp8_channel(w)
    return {"weight": wq, "weight_scale": scale.reshape(-1, 1)}, wq.double() * scale.double()[:, None]


def make_config(fmt: str, requested: str | None = None):
    from aphrodite.modeling.layers.quantization import canonical_method, get_quantization_config
    cfg = quantization_config(fmt)
    method = canonical_method(cfg["quant_method"]) if cfg else "fp8"
    return get_quantization_config(method, cfg or {})


_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized_checkpoint(hf: torch.nn.Module, directory: Path, fmt: str) -> torch.nn.Module:
    """Save transformers model ``hf`` with its projections in ``fmt`` (config.json with the tool's
    ``quantization_config``); ``hf`` itself is given the dequantized weights and returned in eval mode."""
    from safetensors.torch import save_file
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in hf.state_dict().items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module.rsplit(".", 1)[-1] in _PROJ:
                parts, ref = write_layer(fmt, param)
                tensors.update({f"{module}.{k}": v.contiguous() for k, v in parts.items()})
                param.copy_(ref.float())
            else:
                tensors[name] = param.contiguous()
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    hf.config.save_pretrained(directory)
    qcfg = quantization_config(fmt)
    if qcfg is not None:
        cfg = json.loads((directory / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (directory / "config.json").write_text(json.dumps(cfg))
    return hf.eval()
