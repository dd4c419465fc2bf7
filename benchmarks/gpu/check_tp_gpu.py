"""Tensor parallelism on two H200s: TP=2 against TP=1, and what the all-reduces cost.

    python3 benchmarks/gpu/check_tp_gpu.py            # on nvidia-h200-x2, about 3-4 minutes

1. All-reduce microbenchmark (2 processes, NCCL with NVLink multicast off): 8 KB .. 64 MB in
   bf16, the custom one-shot all-reduce over CUDA IPC against NCCL, eager and replayed from CUDA
   graphs; the custom result must equal NCCL's bit for bit (a sum of two bf16 is rounded once
   either way). Then one decode step's worth: 64 all-reduces of 8 KB ([1, 4096] bf16) in a graph.
2. A Llama-3.1-8B-shaped checkpoint with random weights from a fixed seed (HF-style init: normal
   std 0.02, norms 1) is written once as sharded safetensors, so TP=1 and TP=2 hold the same model
   and each TP rank reads only its slices of it.
3. The engine (``LLM``) at TP=2, at TP=2 with ``disable_custom_all_reduce`` and at TP=1, each in
   its own process: greedy tokens for 16 random prompts (fraction identical to TP=1 and first
   divergence), first-step logprobs (TP=2 vs TP=1 within LOGPROB_TOL, the same top token in at least
   14 of 16 prompts, a near tie of TP=1's own counting as the same), time to ready, first-token
   latency of a 128-token prompt and batch-1 decode speed (128 in / 256 out).
A short table comes last.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aphrodite.distributed.parallel_state import disable_nvlink_multicast  # noqa: E402

disable_nvlink_multicast()   # NVLink multicast stays off in this process and the ranks it starts

import torch  # noqa: E402
from _timing import eager_us  # noqa: E402

SIZES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20, 64 << 20]
NUM_PROMPTS = 16
MAX_TOKENS = 32
# First-step logprobs (about -12 for a random 128K vocabulary): bf16 activations rounded through 32
# layers in a different reduction order; 0.25 is ~2% of their size. Greedy tokens may diverge later
# (near-ties of a random model), which is reported, not failed.
LOGPROB_TOL = 0.25


# ----------------------------------------------------------------------------- all-reduce


def _time_graph(fn, per_graph: int, replays: int) -> float:
    import torch.distributed as dist
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * per_graph)


def _graph_or_none(what: str, fn, per_graph: int, failures: list[str]) -> float | None:
    """``_time_graph``, or None with the reason recorded when the path cannot be captured."""
    try:
        return _time_graph(fn, per_graph, 20)
    except Exception as e:
        failures.append(f"{what}: {type(e).__name__}: {e}")
        return None


def _allreduce_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from aphrodite.distributed import communication
    from aphrodite.distributed import parallel_state as ps
    os.environ["APHRODITE_CUSTOM_AR_MAX_BYTES"] = str(max(SIZES))
    try:
        ps.init_distributed(2, rank, tp_size=2, pp_size=1, backend="nccl", init_method=f"file://{init_file}",
                            local_rank=rank)
        custom = communication.get_custom_all_reduce()
        group = ps.get_tp_group()
        rows, failures = [], []
        for size in SIZES:
            n = size // 2
            gen = torch.Generator(device="cuda").manual_seed(1000 * size + rank)
            x = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = x.clone()
            dist.all_reduce(ref, group=group)
            row = {"bytes": size}
            if custom is not None:
                got = custom.all_reduce(x)
                row["equal"] = bool(torch.equal(got, ref))
                if not row["equal"]:
                    failures.append(f"{size} B: custom != NCCL (max diff {(got.float() - ref.float()).abs().max()})")
            iters = 200 if size <= (1 << 20) else 20
            nccl_fn = functools.partial(dist.all_reduce, x.clone(), group=group)
            custom_fn = functools.partial(custom.all_reduce, x) if custom is not None else None
            row["nccl_eager"] = eager_us(nccl_fn, iters, warmup=5)
            if custom_fn is not None:
                row["custom_eager"] = eager_us(custom_fn, iters, warmup=5)
            for name, fn in (("nccl_graph", nccl_fn), ("custom_graph", custom_fn)):
                if fn is not None:
                    row[name] = _graph_or_none(f"{name} {size} B", fn, 16 if size <= (1 << 20) else 4, failures)
            rows.append(row)
        # One decode step of the 8B shape at TP=2: 64 all-reduces of [1, 4096] bf16, from a graph.
        step = {}
        h = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
        per_op = _graph_or_none("nccl step", functools.partial(dist.all_reduce, h.clone(), group=group), 64,
                                failures)
        step["nccl"] = None if per_op is None else 64 * per_op
        if custom is not None:
            per_op = _graph_or_none("custom step", functools.partial(custom.all_reduce, h), 64, failures)
            step["custom"] = None if per_op is None else 64 * per_op
        # Replayed graphs must still agree with NCCL (the device-side epochs advanced correctly).
        if custom is not None:
            y = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
            out_buf = torch.empty_like(y)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                custom.all_reduce(y, out_buf)
            for i in range(5):
                y.copy_(torch.full_like(y, float(rank + i)))
                graph.replay()
                torch.cuda.synchronize()
                if not torch.all(out_buf == float(2 * i + 1)):
                    failures.append(f"graph replay {i}: custom all-reduce gave {out_buf[:4].tolist()}")
        dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps({"rows": rows, "step": step, "custom": custom is not None,
                                             "failures": failures}))
        ps.destroy_distributed()
    except BaseException:
        Path(f"{out}.rank{rank}.err").write_text(traceback.format_exc())
        raise


def allreduce_bench(tmp: str) -> dict:
    import torch.multiprocessing as mp
    out = f"{tmp}/allreduce.json"
    procs = [mp.get_context("spawn").Process(target=_allreduce_worker, args=(r, f"{tmp}/ar_rdv", out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        if p.is_alive():
            p.kill()
    errors = "".join(Path(f).read_text() for f in sorted(Path(tmp).glob("allreduce.json.rank*.err")))
    if errors or not Path(out).exists():
        return {"error": errors or "no output"}
    return json.loads(Path(out).read_text())


# ----------------------------------------------------------------------------- checkpoint

def write_checkpoint(path: Path, seed: int = 0) -> float:
    """Llama-3.1-8B's shape, bf16, std-0.02 matrices and unit norms, in 5 safetensors shards."""
    from safetensors.torch import save_file

    from aphrodite.benchmarks.model_shapes import MODEL_SHAPES, write_model_shape
    start = time.perf_counter()
    cfg = MODEL_SHAPES["llama-3.1-8b"]
    write_model_shape("llama-3.1-8b", path)
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, device="cuda", generator=gen) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        if shard_bytes >= 4 << 30:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- engine runs

def _engine_worker(model: str, tp: int, disable_custom: bool, out: str) -> None:
    if disable_custom:   # also where a worker does not pass disable_custom_all_reduce on: no message qualifies
        os.environ["APHRODITE_CUSTOM_AR_MAX_BYTES"] = "0"
    try:
        from aphrodite import LLM, SamplingParams
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 120000) for _ in range(rng.randint(16, 512))] for _ in range(NUM_PROMPTS)]
        start = time.perf_counter()
        llm = LLM(model, tensor_parallel_size=tp, disable_custom_all_reduce=disable_custom, dtype="bfloat16",
                  skip_tokenizer_init=True, max_model_len=4096, seed=0)
        ready = time.perf_counter() - start
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5,
                                detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        tokens = [o.outputs[0].token_ids for o in outs]
        first = [{str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outs]
        prompt = [{"prompt_token_ids": [rng.randrange(1000, 120000) for _ in range(128)]}]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        decode = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
        for _ in range(2):   # warm-up, then measure
            t = time.perf_counter()
            llm.generate(prompt, one, use_tqdm=False)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            llm.generate(prompt, decode, use_tqdm=False)
            total = time.perf_counter() - t
        Path(out).write_text(json.dumps({"tokens": tokens, "first": first, "ready_s": ready, "ttft_ms": ttft * 1e3,
                                         "tok_s": 256 / total, "ms_per_token": (total - ttft) / 255 * 1e3}))
        llm.llm_engine.shutdown()
    except BaseException:
        Path(f"{out}.err").write_text(traceback.format_exc())
        raise


def run_engine(model: str, tp: int, disable_custom: bool, tmp: str) -> dict:
    import multiprocessing as mp
    out = f"{tmp}/engine_tp{tp}_{int(disable_custom)}.json"
    p = mp.get_context("spawn").Process(target=_engine_worker, args=(model, tp, disable_custom, out))
    p.start()
    p.join(400)
    if p.is_alive():
        p.kill()
    if Path(f"{out}.err").exists() or not Path(out).exists():
        err = Path(f"{out}.err").read_text() if Path(f"{out}.err").exists() else f"exit code {p.exitcode}"
        return {"error": err}
    return json.loads(Path(out).read_text())


def compare(a: dict, b: dict) -> dict:
    """Greedy tokens and first-step logprobs of run ``a`` against run ``b`` (the TP=1 reference)."""
    same = total = 0
    divergences = []
    for ta, tb in zip(a["tokens"], b["tokens"], strict=True):
        total += len(tb)
        same += sum(x == y for x, y in zip(ta, tb))
        divergences.append(next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(tb)))
    diffs, top1 = [], 0
    for fa, fb in zip(a["first"], b["first"], strict=True):
        diffs += [abs(fa[k] - fb[k]) for k in fb if k in fa]
        ka, kb = max(fa, key=fa.get), max(fb, key=fb.get)
        # The same greedy token, or a near tie in the reference itself: TP=2's choice is within the bf16
        # tolerance of TP=1's best there (a random model's top tokens are often that close).
        top1 += ka == kb or (ka in fb and fb[kb] - fb[ka] <= LOGPROB_TOL)
    return {"identical": same / total, "first_divergence_min": min(divergences),
            "first_divergence_mean": sum(divergences) / len(divergences),
            "prompts_identical": sum(d == MAX_TOKENS for d in divergences),
            "logprob_max_diff": max(diffs) if diffs else float("nan"), "top1_same": top1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-nccl-only", action="store_true", help="skip the TP=2 run without the custom all-reduce")
    parser.add_argument("--skip-engine", action="store_true", help="only the all-reduce microbenchmark")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs")
        return 1
    ok = True
    with tempfile.TemporaryDirectory(dir=os.environ.get("CHECK_TP_TMP")) as tmp:
        ar = allreduce_bench(tmp)
        print(json.dumps(ar, indent=1), flush=True)
        ok &= "error" not in ar and ar.get("custom", False) and not ar.get("failures")
        runs: dict[str, dict] = {}
        if not args.skip_engine:
            model = Path(tmp) / "llama8b"
            print(f"checkpoint written in {write_checkpoint(model):.1f} s", flush=True)
            configs = [("TP=2", 2, False)] + ([] if args.skip_nccl_only else [("TP=2 nccl-only", 2, True)])
            for label, tp, disable in configs + [("TP=1", 1, False)]:
                runs[label] = run_engine(str(model), tp, disable, tmp)
                print(label, {k: v for k, v in runs[label].items() if k not in ("tokens", "first")}, flush=True)

    print("\n== all-reduce (bf16, 2 x H200, us per call) ==")
    if "error" in ar:
        print(ar["error"])
    else:
        print(f"{'bytes':>10} {'nccl eager':>11} {'custom eager':>13} {'nccl graph':>11} {'custom graph':>13} "
              f"{'equal':>6}")

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"
        for r in ar["rows"]:
            print(f"{r['bytes']:>10} {f(r.get('nccl_eager')):>11} {f(r.get('custom_eager')):>13} "
                  f"{f(r.get('nccl_graph')):>11} {f(r.get('custom_graph')):>13} {str(r.get('equal', '-')):>6}")
        step = ar["step"]
        print(f"decode step, 64 x 8 KB in a graph: NCCL {f(step.get('nccl'))} us, custom "
              f"{f(step.get('custom'))} us")
        for failure in ar.get("failures", []):
            print("FAIL", failure)
    if runs:
        print("\n== engine, Llama-3.1-8B shape, random weights (seed 0), bf16 ==")
        ref = runs.get("TP=1", {})
        print(f"{'run':<16} {'ready s':>8} {'TTFT ms':>8} {'tok/s':>7} {'ms/tok':>7} {'same tok':>9} "
              f"{'same prompts':>13} {'1st div':>8} {'top1':>5} {'max dlogp':>10}")
        for label, r in runs.items():
            if "error" in r:
                print(f"{label:<16} ERROR: {r['error'].strip().splitlines()[-1]}")
                ok = False
                continue
            cmp = compare(r, ref) if "tokens" in ref and label != "TP=1" else None
            cols = (f"{cmp['identical']:>9.1%} {cmp['prompts_identical']:>10}/{NUM_PROMPTS} "
                    f"{cmp['first_divergence_min']:>8} {cmp['top1_same']:>2}/{NUM_PROMPTS} "
                    f"{cmp['logprob_max_diff']:>10.3f}") if cmp else f"{'(reference)':>9}"
            print(f"{label:<16} {r['ready_s']:>8.1f} {r['ttft_ms']:>8.1f} {r['tok_s']:>7.1f} "
                  f"{r['ms_per_token']:>7.2f} {cols}")
            if cmp:
                ok &= cmp["top1_same"] >= NUM_PROMPTS - 2 and cmp["logprob_max_diff"] <= LOGPROB_TOL
    print("CHECK_TP", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
