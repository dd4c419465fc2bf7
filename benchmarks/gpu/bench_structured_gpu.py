"""Structured output on the GPU (issue 16): a throughput-decode style run on Llama-3.1-8B's shape (dummy
bf16 weights) with every request JSON-schema constrained vs unconstrained; target: constrained keeps
>= 90% of the output tok/s.

The shape has no tokenizer, and xgrammar needs one: a 4,096-token byte-level BPE is trained at start
(about a second) on synthetic JSON text and written next to the shape's config.json, then filled up to the
model's vocabulary as Llama-3's is: every id a real token (the rest made-up words the merges never produce),
the last 256 reserved special tokens. ``--phantom-ids`` leaves ids 4,096 and up without a token instead, as
the first versions of this script did: xgrammar then counts ~124k special tokens, and its per-token accept
scans them (22 us a token at a 128k vocabulary against 0.6 us at 4k, on the dev box), a cost no real
tokenizer has. The schema's long required string (minLength 20,000 characters)
cannot be complete before ``--output-len`` tokens, so both runs generate every token; each
constrained output is checked to be a valid prefix of the schema (its matcher accepted every token).

Needs xgrammar (not in the GPU image): carry its wheels and install them first, e.g.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu/bench_structured_gpu.py --num-prompts 256     # one H200, ~2 minutes

With async scheduling (on by default on the GPU) a constrained step is sent before the tokens its mask
depends on are known; only its sampler waits for the mask, so the host's grammar work overlaps the
forward pass. The table after the results splits the host's time per step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTHONPATH"):
    sys.path[:0] = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p]

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 6},
    "body": {"type": "string", "minLength": 20000}},
    "required": ["title", "tags", "body"], "additionalProperties": False}
_WORDS = ("the of and to in is you that it was for on are as with his they at be this have from or one had by "
          "word but not what all were we when your can said there use an each which she do how their if will up "
          "other about out many then them these so some her would make like him into time has look two more "
          "write go see number no way could people my than first water been call who its now find").split()


def write_tokenizer(directory: str, vocab_size: int = 4096, pad_to: int | None = None) -> None:
    """A byte-level BPE trained on synthetic JSON documents, saved as a Hugging Face fast tokenizer; with
    ``pad_to``, filled up to that many ids with made-up words (Ġ + letters) and 256 reserved specials last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = random.Random(0)

    def doc() -> str:
        return json.dumps({"title": " ".join(rng.choices(_WORDS, k=6)), "n": rng.randint(0, 10 ** 6),
                           "tags": rng.choices(_WORDS, k=4), "body": " ".join(rng.choices(_WORDS, k=60)),
                           "ok": rng.random() < 0.5, "none": None, "f": rng.random()})

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((doc() for _ in range(4000)), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    if pad_to:
        _pad_vocab(os.path.join(directory, "tokenizer.json"), pad_to)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "bos_token": "<|endoftext|>", "model_max_length": 131072}, f)


def _pad_vocab(path: str, size: int, specials: int = 256) -> None:
    """Give every id below ``size`` a token: words the merges never produce, then ``specials`` reserved ones."""
    import itertools
    import string
    data = json.load(open(path))
    vocab = data["model"]["vocab"]
    words = ("\u0120" + "".join(p) for k in itertools.count(3) for p in itertools.product(string.ascii_lowercase,
                                                                                           repeat=k))
    while len(vocab) < size - specials:
        w = next(words)
        if w not in vocab:
            vocab[w] = len(vocab)
    for i in range(size - len(vocab)):
        content = f"<|reserved_special_token_{i}|>"
        data["added_tokens"].append({"id": len(vocab), "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        vocab[content] = len(vocab)
    with open(path, "w") as f:
        json.dump(data, f)


HOST: dict[str, float] = {}      # host seconds per engine piece during the timed run (see ``time_host``)


def time_host(engine) -> None:
    """Wrap the engine's per-step pieces in wall-clock timers (added to ``HOST``): where the host's time
    goes. ``wait+absorb`` includes waiting for the device; ``fill`` is the grammar bitmask; ``sampler`` and
    ``mask upload`` (the worker's, in process) are inside ``queue forward`` or ``queue sampler``."""
    def wrap(owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                HOST[label] = HOST.get(label, 0.0) + time.perf_counter() - t
                if label == "step":
                    HOST["calls"] = HOST.get("calls", 0) + 1
        setattr(owner, attr, timed)
    wrap(engine, "step", "step")
    wrap(engine, "_schedule", "schedule")
    wrap(engine, "_plan", "plan")
    wrap(engine.executor, "execute_async", "queue forward")
    wrap(engine, "_process_oldest", "wait+absorb")
    wrap(engine, "_grammar_bitmask", "fill")
    wrap(engine.executor, "sample_async", "queue sampler")
    runner = getattr(engine.executor, "runner", None)      # in process: the worker's pieces too
    if runner is not None:
        wrap(runner, "sampler", "sampler")
        wrap(runner, "_upload_bitmask", "mask upload")


def run(llm, prompts: list[list[int]], params) -> tuple[float, list, dict[str, float]]:
    HOST.clear()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, outs, dict(HOST)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--phantom-ids", action="store_true",
                    help="leave ids past the trained 4,096 without a token (see the docstring)")
    args = ap.parse_args()
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        sys.exit("xgrammar is not installed: carry its wheels (see the docstring) and set PYTHONPATH=/tmp/site")
    from aphrodite import LLM, SamplingParams
    from aphrodite.benchmarks.common import random_token_prompts
    from aphrodite.benchmarks.model_shapes import write_model_shape
    from aphrodite.sampling_params import StructuredOutputsParams

    with tempfile.TemporaryDirectory(prefix="aphrodite-structured-") as tmp:
        write_model_shape(args.shape, tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            model_vocab = json.load(f)["vocab_size"]
        write_tokenizer(tmp, pad_to=None if args.phantom_ids else model_vocab)
        t0 = time.perf_counter()
        llm = LLM(model=tmp, load_format="dummy", dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16,
                  seed=0)
        print(f"engine start-up {time.perf_counter() - t0:.1f} s", flush=True)
        vocab = llm.llm_engine.config.model.hf_config.vocab_size
        prompts = random_token_prompts(args.num_prompts, args.input_len, vocab, seed=0)
        common = dict(temperature=1.0, seed=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
        free = SamplingParams(**common)
        schema = SamplingParams(**common, structured_outputs=StructuredOutputsParams(json=SCHEMA))
        llm.llm_engine.compile_structured_outputs([schema])      # compiled once, cached (outside the timing)
        run(llm, prompts[:8], SamplingParams(**{**common, "max_tokens": 16}))      # warm-up
        run(llm, prompts[:8], SamplingParams(**{**common, "max_tokens": 16},
                                             structured_outputs=StructuredOutputsParams(json=SCHEMA)))
        time_host(llm.llm_engine)
        rows, hosts = [], []
        for name, params in (("unconstrained", free), ("JSON-schema constrained", schema)):
            secs, outs, host = run(llm, prompts, params)
            hosts.append(host)
            toks = [list(o.outputs[0].token_ids) for o in outs]
            n_out = sum(len(t) for t in toks)
            rows.append((name, secs, n_out, toks, [o.outputs[0].finish_reason for o in outs]))
            print(f"{name}: {n_out} output tokens in {secs:.1f} s", flush=True)

    # Correctness: every constrained output is a prefix the schema's grammar accepts, token by token.
    tokenizer = llm.get_tokenizer()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    bad = 0
    for toks in rows[1][3]:
        m = xgrammar.GrammarMatcher(compiled)
        bad += not all(m.accept_token(t) for t in toks)
    sample = tokenizer.decode(rows[1][3][0][:40])
    full = sum(len(t) == args.output_len for t in rows[1][3])
    print()
    print(f"{args.shape}, dummy bf16, {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, "
          f"temperature 1.0, ignore_eos, tokenizer {'with phantom ids' if args.phantom_ids else 'of full vocabulary'}"
          f" ({len(tokenizer)} tokens, xgrammar special ids: {len(info.special_token_ids)})")
    print(f"constrained output starts: {sample!r}")
    print(f"{'run':<26}{'seconds':>9}{'output tok':>12}{'output tok/s':>14}")
    for name, secs, n_out, _, _ in rows:
        print(f"{name:<26}{secs:>9.1f}{n_out:>12}{n_out / secs:>14.1f}")
    labels = [k for k in ("step", "schedule", "plan", "queue forward", "wait+absorb", "fill", "queue sampler",
                          "sampler", "mask upload")
              if k in hosts[0] or k in hosts[1]]
    print("host ms per engine step (wait+absorb includes the wait for the device)")
    print(f"{'':<26}" + "".join(f"{k:>14}" for k in labels))
    for (name, *_), host in zip(rows, hosts):
        per = 1e3 / max(1, host.get("calls", 1))
        print(f"{name:<26}" + "".join(f"{host.get(k, 0.0) * per:>14.2f}" for k in labels))
    ratio = (rows[1][2] / rows[1][1]) / (rows[0][2] / rows[0][1])
    print(f"constrained / unconstrained: {ratio:.3f} (target >= 0.90: {'ok' if ratio >= 0.9 else 'MISSED'}); "
          f"constrained outputs rejected by the grammar: {bad}; full length: {full}/{len(rows[1][3])}")


if __name__ == "__main__":
    main()
