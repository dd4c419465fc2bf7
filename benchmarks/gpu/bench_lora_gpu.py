"""LoRA on one H200: Llama-3.1-8B's shape with dummy bf16 weights, with and without adapters.

    python3 benchmarks/gpu/bench_lora_gpu.py            # about 3 minutes; a table last
    NUM_PROMPTS=100 python3 benchmarks/gpu/bench_lora_gpu.py --skip-kernel-check    # under 2 minutes

1. Kernel check at the 8B shapes: the Triton shrink/expand against the PyTorch reference, 8 slots of
   rank 16, decode-sized and prefill-sized batches.
2. Each configuration runs in its own process (a clean GPU for the KV-cache profiling):
   * ``base``: no LoRA (``enable_lora`` off);
   * ``lora``: ``enable_lora=True, max_loras=8, max_lora_rank=16`` and 8 distinct random rank-16 adapters
     (PEFT files on q/k/v/o/gate/up/down, non-zero B), spread round-robin over the requests.
   Workloads: throughput-decode (random prompts, 128 in / 1024 out, ignore_eos; NUM_PROMPTS=500 rather
   than DESIGN.md's 1000 so that the four runs fit in about 3 minutes) and latency-1 (1 request,
   128 in / 256 out; the lora run uses one adapter). Then the batch-1 decode CUDA graph is replayed
   on its own: GPU microseconds per decode step and kernels per step (torch.profiler), for the base
   engine, and for the LoRA engine with the adapter's token and with a base-model token (the graph
   without LoRA kernels the runner replays when no token of a small step has an adapter).
Floors: throughput-decode with 8 adapters >= 80% of base; latency-1 with one adapter >= 90% of base.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

NUM_PROMPTS = int(os.environ.get("NUM_PROMPTS", "500"))
NUM_ADAPTERS = 8
RANK = 16
TARGETS = {  # module: (in, out) of Llama-3.1-8B
    "q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096),
}


def write_adapter(directory: Path, seed: int, layers: int = 32) -> None:
    """A random PEFT LoRA adapter (rank 16, all seven projections) for Llama-3.1-8B."""
    import torch
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (fan_in, fan_out) in TARGETS.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=gen) * 0.01).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, RANK, generator=gen) * 0.01).bfloat16()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(TARGETS), "bias": "none"}))


def kernel_check() -> str:
    import torch

    from aphrodite.kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref, lora_token_metadata
    rows = []
    for tokens in (256, 4096):
        for k, n in ((4096, 6144), (14336, 4096)):
            slots = torch.randint(-1, NUM_ADAPTERS, (tokens,), device="cuda")
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            a = torch.randn(NUM_ADAPTERS, 48, k, device="cuda", dtype=torch.bfloat16) * 0.02
            b = torch.randn(NUM_ADAPTERS, n, 48, device="cuda", dtype=torch.bfloat16) * 0.02
            y = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
            meta = lora_token_metadata(slots, NUM_ADAPTERS)
            buf = lora_shrink(x, a, meta)
            got = lora_expand(buf, b, meta, y.clone())
            ref = lora_expand_ref(lora_shrink_ref(x, a, slots), b, slots, y.clone())
            err = (got.float() - ref.float()).abs().max().item()
            scale = (ref.float() - y.float()).abs().max().item()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                lora_expand(lora_shrink(x, a, meta), b, meta, y)
            torch.cuda.synchronize()
            us = (time.perf_counter() - start) / 20 * 1e6
            rows.append(f"kernel T={tokens} K={k} N={n}: max err {err:.3g} (delta scale {scale:.3g}), "
                        f"shrink+expand {us:.0f} us")
            assert err <= 0.02 * scale + 0.02, rows[-1]
    return "\n".join(rows)


def graph_step(llm, kind: str) -> dict:
    """Replay the batch-1 decode graph as the last latency-1 step left it (its KV writes land in freed
    blocks): microseconds per step between CUDA events, and kernels per step from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    runner = getattr(llm.llm_engine.executor, "runner", None)
    if runner is None or runner.graphs is None or 1 not in runner.graphs.graphs:
        return {}
    out = {}
    for label, lora_id in ([("base", None)] if kind == "base" else [("adapter", 1), ("base_token", 0)]):
        graph, _ = runner.graphs.graphs[1]
        if lora_id is not None:
            runner.lora_manager.set_step([lora_id], [1])
            if lora_id == 0 and 1 in runner.graphs.plain_graphs:     # what the runner replays for it
                graph, _ = runner.graphs.plain_graphs[1]
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        out[f"step_us_{label}"] = start.elapsed_time(end) / 50 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        out[f"kernels_{label}"] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def run_config(kind: str, model_dir: str, adapters: list[str]) -> dict:
    """One engine (base or LoRA): throughput-decode then latency-1; returns the numbers."""
    from aphrodite import LLM, LoRARequest, SamplingParams
    from aphrodite.benchmarks.common import random_token_prompts
    kwargs = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, dtype="bfloat16")
    lora = kind == "lora"
    if lora:
        kwargs.update(enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
    start = time.perf_counter()
    llm = LLM(model_dir, **kwargs)
    startup = time.perf_counter() - start
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)] if lora else []
    prompts = [{"prompt_token_ids": p} for p in random_token_prompts(NUM_PROMPTS, 128, 128256, 0)]
    per_prompt = [loras[i % len(loras)] for i in range(len(prompts))] if loras else None
    params = SamplingParams(temperature=0.0, max_tokens=1024, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False,
                 lora_request=per_prompt[:8] if per_prompt else None)        # warm-up (adapters loaded here)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=per_prompt)
    elapsed = time.perf_counter() - start
    decode_tps = sum(len(o.outputs[0].token_ids) for o in outs) / elapsed

    one = [prompts[0]]
    lat_params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)
    lora_one = loras[0] if loras else None
    llm.generate(one, lat_params, use_tqdm=False, lora_request=lora_one)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(one, lat_params, use_tqdm=False, lora_request=lora_one)
        times.append(time.perf_counter() - start)
    lat = sorted(times)[1]
    return {"kind": kind, "startup_s": startup, "decode_output_tok_s": decode_tps, "decode_elapsed_s": elapsed,
            "latency1_s": lat, "latency1_tok_s": 256 / lat, **graph_step(llm, kind)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        result = run_config(sys.argv[2], sys.argv[3], sys.argv[4:])
        print("RESULT " + json.dumps(result), flush=True)
        return
    from aphrodite.benchmarks.model_shapes import write_model_shape
    if "--skip-kernel-check" not in sys.argv:     # bench_lora_step.py checks the small-batch kernels
        print(kernel_check(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_model_shape("llama-3.1-8b", Path(tmp) / "model"))
        adapters = []
        for i in range(NUM_ADAPTERS):
            write_adapter(Path(tmp) / f"adapter{i}", seed=i)
            adapters.append(str(Path(tmp) / f"adapter{i}"))
        results = {}
        for kind in ("base", "lora"):
            proc = subprocess.run([sys.executable, __file__, "--run", kind, model_dir, *adapters],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-6000:])
                raise SystemExit(f"the {kind} run failed")
            results[kind] = json.loads(line[len("RESULT "):])
            print(f"{kind}: {results[kind]}", flush=True)
    base, lora = results["base"], results["lora"]
    dec = lora["decode_output_tok_s"] / base["decode_output_tok_s"]
    lat = lora["latency1_tok_s"] / base["latency1_tok_s"]
    print("\n| workload (Llama-3.1-8B shape, H200, bf16) | no LoRA | LoRA | ratio | floor |")
    print("|---|---|---|---|---|")
    print(f"| throughput-decode, {NUM_PROMPTS} x 128/1024, {NUM_ADAPTERS} rank-{RANK} adapters | "
          f"{base['decode_output_tok_s']:,.0f} output tok/s | {lora['decode_output_tok_s']:,.0f} output tok/s | "
          f"{dec:.1%} | >= 80% {'OK' if dec >= 0.8 else 'MISSED'} |")
    print(f"| latency-1, 128/256, one adapter | {base['latency1_tok_s']:.1f} tok/s | {lora['latency1_tok_s']:.1f} "
          f"tok/s | {lat:.1%} | >= 90% {'OK' if lat >= 0.9 else 'MISSED'} |")
    if "step_us_base" in base and "step_us_adapter" in lora:
        b, a, t = base["step_us_base"], lora["step_us_adapter"], lora["step_us_base_token"]
        print(f"| batch-1 decode graph, GPU us/step (kernels) | {b:.0f} ({base['kernels_base']}) | adapter {a:.0f} "
              f"({lora['kernels_adapter']}); base token {t:.0f} ({lora['kernels_base_token']}) | {b / a:.1%} | - |")



if __name__ == "__main__":
    main()
