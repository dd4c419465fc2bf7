"""Where a CPU run's time goes: wall-clock timers around the model's pieces, split by step kind.

torch.profiler misses the ctypes C kernels and inflates small ops, so this wraps the
functions themselves with ``perf_counter``. Usage (default model, 64 x 128/128 bf16):

    python benchmarks/cpu/profile_step.py --dtype bfloat16 --num-prompts 64 --input-len 128 --output-len 128

Latency-1 of the default model from its GGUF blocks (``--quantization none`` dequantizes at load):

    python benchmarks/cpu/profile_step.py --dtype float32 --num-prompts 1 --input-len 128 --output-len 256
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

import aphrodite.kernels.cpu.gguf_ops as gguf_ops
import aphrodite.kernels.cpu.ops as cpu_ops
import aphrodite.modeling.layers.attention as attention
import aphrodite.modeling.layers.embedding as embedding
import aphrodite.modeling.layers.linear as linear
import aphrodite.modeling.layers.rotary as rotary
import aphrodite.modeling.layers.sampler as sampler
import aphrodite.worker.model_runner as model_runner
from aphrodite import LLM, SamplingParams

TIMES: dict[tuple[str, str], float] = defaultdict(float)
PHASE = ["idle"]


def timed(owner: object, attr: str, label: str) -> None:
    fn = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[(PHASE[0], label)] += time.perf_counter() - t
    setattr(owner, attr, wrapper)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--quantization", default=None, help="none: dequantize the GGUF at load")
    args = p.parse_args()
    kwargs = {} if args.quantization is None else {"quantization": args.quantization}
    llm = LLM(dtype=args.dtype, skip_tokenizer_init=True, **kwargs)
    vocab = llm.llm_engine.config.model.hf_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, args.input_len).tolist()}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up

    orig_dense = linear.dense

    def dense(x, weight, bias=None, packed=None):
        rows = x.numel() // x.shape[-1]
        label = "lm_head" if weight.shape[0] == vocab else ("gemv" if rows <= 8 else "gemm")
        t = time.perf_counter()
        try:
            return orig_dense(x, weight, bias, packed)
        finally:
            TIMES[(PHASE[0], label)] += time.perf_counter() - t
    linear.dense = dense
    embedding.dense = dense
    orig_gguf = gguf_ops.linear

    def gguf_linear(qweight, qtype, x, *a, **kw):
        rows = x.numel() // x.shape[-1]
        label = "gguf lm_head" if qweight.shape[0] == vocab else f"gguf N={qweight.shape[0]}"
        label += "" if rows <= 8 else " (M>8)"
        t = time.perf_counter()
        try:
            return orig_gguf(qweight, qtype, x, *a, **kw)
        finally:
            TIMES[(PHASE[0], label)] += time.perf_counter() - t
    gguf_ops.linear = gguf_linear
    timed(gguf_ops, "dequantize", "gguf dequantize")
    timed(model_runner.ModelRunner, "_forward", "FORWARD")
    timed(cpu_ops, "write_kv", "write_kv")
    timed(attention, "_decode_attention", "decode_attn")
    timed(cpu_ops, "paged_decode_attention", "  (C kernel)")
    timed(attention, "_prefill_attention", "prefill_attn")
    timed(cpu_ops, "rms_norm", "rms_norm")
    timed(cpu_ops, "silu_and_mul", "silu_mul")
    timed(rotary.RotaryEmbedding, "rotate_qk", "rotary")
    timed(cpu_ops, "rope_write_kv", "rope_write_kv")
    timed(sampler.Sampler, "__call__", "sampler")
    runner_cls = model_runner.ModelRunner
    orig_queue = runner_cls.queue

    def queue(self, plan, *args, **kwargs):
        PHASE[0] = "decode" if all(n == 1 for n in plan.num_scheduled) else "prefill"
        t = time.perf_counter()
        try:
            return orig_queue(self, plan, *args, **kwargs)
        finally:
            TIMES[(PHASE[0], "STEP")] += time.perf_counter() - t
            TIMES[(PHASE[0], "steps")] += 1
    runner_cls.queue = queue

    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"total {total:.2f} s, {n_out / total:.1f} output tok/s")
    for phase in ("prefill", "decode"):
        steps = TIMES[(phase, "steps")]
        print(f"{phase}: {int(steps)} steps, {TIMES[(phase, 'STEP')]:.2f} s")
        for (ph, label), v in sorted(TIMES.items(), key=lambda kv: -kv[1]):
            if ph == phase and label not in ("steps", "STEP"):
                print(f"  {label:14s} {v:7.2f} s  {1e3 * v / max(steps, 1):8.2f} ms/step")


if __name__ == "__main__":
    main()
