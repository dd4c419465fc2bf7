"""The engine's and worker's host time per step at a large batch, split by function.

With async scheduling the host must schedule, plan and build step N+1's inputs (and absorb step
N's tokens) while the device runs step N, so this host work per step has to stay well under the
GPU's step time (a few ms for an 8B model at 1000 sequences). A tiny random Llama makes the model's
own time small, so what is left is mostly the host loop. Each function is wrapped in a timer (inner
timers are included in outer ones; "host" is the step minus the MODEL rows), by default of this thread's
CPU time, which other processes on a shared machine do not inflate (``--clock wall`` for elapsed time).
With ``--tp 2`` the workers run in their own processes: only the engine's side is timed.

    python benchmarks/cpu/profile_host_loop.py [--num-prompts 1000 --input-len 32 --output-len 128 --repeat 3]
    python benchmarks/cpu/profile_host_loop.py --tp 2    # mp executor, two gloo ranks
    python benchmarks/cpu/profile_host_loop.py --cprofile 25    # plus the top functions by own time
    # throughput-prefill's shape scaled down: 16 new prompts join ~1000 running ones every step
    python benchmarks/cpu/profile_host_loop.py --input-len 256 --output-len 32 --max-num-batched-tokens 4096
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

TIMES: dict[tuple[str, str], float] = defaultdict(float)
CLOCK = [time.thread_time]      # --clock wall: time.perf_counter
STEPS: dict[str, int] = defaultdict(int)
PHASE = ["decode"]


def timed(owner: object, attr: str, label: str) -> None:
    """Wrap ``owner.attr`` so its wall time adds to ``label`` in the current phase."""
    fn = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t = CLOCK[0]()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[(PHASE[0], label)] += CLOCK[0]() - t
    setattr(owner, attr, wrapper)


def tiny_llama(path: str, vocab: int) -> str:
    """A random tiny LlamaForCausalLM (2 layers, hidden 64) saved as safetensors: model time ~ nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().eval().save_pretrained(path)
    return path


def instrument(runner) -> None:
    """Timers on the engine's step pieces and (``runner``: in this process) the model runner's."""
    import aphrodite.engine.engine as engine_mod
    import aphrodite.engine.scheduler as scheduler_mod

    orig_step = engine_mod.LLMEngine.step

    def step(self, finished_only=False):
        running = len(self.scheduler.running)
        PHASE[0] = "decode" if running and not self.scheduler.waiting else "prefill"     # prefill: mixed steps
        t = CLOCK[0]()
        try:
            return orig_step(self, finished_only)
        finally:
            TIMES[(PHASE[0], "STEP")] += CLOCK[0]() - t
            STEPS[PHASE[0]] += 1
    engine_mod.LLMEngine.step = step
    timed(scheduler_mod.Scheduler, "schedule", "engine: Scheduler.schedule")
    timed(engine_mod.LLMEngine, "_plan", "engine: _plan")
    timed(engine_mod.LLMEngine, "_advance", "engine: _advance")
    timed(engine_mod.LLMEngine, "_process", "engine: _process")
    if runner is None:      # the mp executor: what sending a step and reading its result cost the engine
        import aphrodite.executor.multiproc as multiproc
        from aphrodite.executor.shm_broadcast import ShmBroadcast
        timed(ShmBroadcast, "enqueue", "engine: broadcast the step (pickle)")
        timed(multiproc.MultiprocExecutor, "_recv", "engine: read the result (unpickle)")
        return
    import aphrodite.modeling.layers.sampler as sampler
    import aphrodite.worker.model_runner as model_runner
    import aphrodite.worker.step_future as step_future
    from aphrodite.worker.sampling_inputs import SamplingState
    from aphrodite.worker.step_inputs import StepInputs
    timed(model_runner.ModelRunner, "queue", "worker: queue (all)")
    orig_apply = model_runner.apply_plan

    def apply_plan(*args):
        t = CLOCK[0]()
        try:
            return orig_apply(*args)
        finally:
            TIMES[(PHASE[0], "worker: apply_plan")] += CLOCK[0]() - t
    model_runner.apply_plan = apply_plan
    timed(model_runner.ModelRunner, "_prepare", "worker: _prepare")
    timed(StepInputs, "to_device", "worker: to_device")
    timed(model_runner.ModelRunner, "_sampling_metadata", "worker: _sampling_metadata")
    timed(SamplingState, "update", "worker: SamplingState.update")
    timed(model_runner.ModelRunner, "_prompt_logprobs", "worker: _prompt_logprobs")
    timed(step_future.StepFuture, "_read", "worker: StepFuture._read")
    timed(model_runner.ModelRunner, "_forward", "MODEL: forward")
    timed(sampler.Sampler, "__call__", "MODEL: sampler")
    timed(runner.model, "compute_logits", "MODEL: compute_logits")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="the GPU default; with --input-len 256 use 4096 for throughput-prefill's 16 prompts a step")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (2: the mp executor on gloo)")
    p.add_argument("--no-async", action="store_true", help="plain scheduling instead of async scheduling")
    p.add_argument("--stream", action="store_true",
                   help="step the engine as the server does (outputs of every running request, every step)")
    p.add_argument("--cprofile", type=int, default=0, help="also print the top N functions by own time")
    p.add_argument("--repeat", type=int, default=3, help="runs; each figure is its best over them")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: this thread's CPU time (steady on a shared machine; the model runs on one thread "
                        "here); wall: elapsed time")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.clock == "wall":
        CLOCK[0] = time.perf_counter
    from aphrodite import LLM, SamplingParams
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_llama(tmp, args.vocab)
        llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=args.tp,
                  max_num_seqs=1024, max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=1024,
                  async_scheduling=not args.no_async, enforce_eager=True)
        rng = np.random.default_rng(0)

        def random_prompts() -> list[dict]:     # new ones for every run: no prefix-cache hits between runs
            return [{"prompt_token_ids": rng.integers(3, args.vocab, args.input_len).tolist()}
                    for _ in range(args.num_prompts)]
        prompts = random_prompts()
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:8], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        instrument(llm.llm_engine.executor.runner if args.tp == 1 else None)
        prof = cProfile.Profile() if args.cprofile else None
        runs = []
        for _ in range(args.repeat):
            TIMES.clear()
            STEPS.clear()
            start = time.perf_counter()
            if prof is not None:
                prof.enable()
            if args.stream:     # as the server's engine loop does: every step's outputs, not only the finished
                engine, done = llm.llm_engine, {}
                for k, prompt in enumerate(random_prompts()):
                    engine.add_request(f"{len(runs)}-{k}", prompt, params)
                while engine.has_unfinished_requests():
                    done.update((o.request_id, o) for o in engine.step() if o.finished)
                outs = list(done.values())
            else:
                outs = llm.generate(random_prompts(), params, use_tqdm=False)
            if prof is not None:
                prof.disable()
            total = time.perf_counter() - start
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            assert n_out == args.num_prompts * args.output_len, n_out
            runs.append((total, dict(TIMES), dict(STEPS)))
        del llm
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)
    # On a shared machine other work only ever adds time: each figure is its best over the repeats.
    total = min(r[0] for r in runs)
    mode = f"async={not args.no_async}" + (", streamed" if args.stream else "")
    print(f"\n{args.num_prompts} x {args.input_len}/{args.output_len} greedy, tp={args.tp}, {mode}: "
          f"{total:.2f} s, {n_out / total:.0f} output tok/s (best of {len(runs)})")
    for phase in ("prefill", "decode"):
        steps = runs[0][2].get(phase, 0)
        if not steps:
            continue
        labels = sorted({k for _, t, _ in runs for (ph, k) in t if ph == phase})
        ms = {k: min(1e3 * t.get((phase, k), 0.0) / s[phase] for _, t, s in runs) for k in labels}
        host = min(1e3 * (t[(phase, "STEP")] - sum(v for (ph, k), v in t.items() if ph == phase
                                                     and k.startswith("MODEL"))) / s[phase] for _, t, s in runs)
        print(f"{phase}: {steps} steps, {ms['STEP']:.2f} ms/step, host {host:.2f} ms/step "
              "(step minus MODEL rows)")
        for label in labels:
            if label != "STEP":
                print(f"  {label:32s} {ms[label]:8.3f} ms/step")


if __name__ == "__main__":
    main()
