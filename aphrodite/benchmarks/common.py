"""What ``bench throughput`` and ``bench latency`` share: engine flags, model shapes,
random token prompts, engine start-up and the facts the Hugging Face baseline needs."""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aphrodite.benchmarks.model_shapes import MODEL_SHAPES, write_model_shape
from aphrodite.engine_args import EngineArgs

if TYPE_CHECKING:
    import torch

    from aphrodite.endpoints.llm import LLM
    from aphrodite.outputs import RequestOutput

# vLLM's random dataset keeps clear of the ids at both ends of the vocabulary, where
# special and reserved tokens live.
_SAFE_ID_MARGIN = 100


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every engine argument (``--model``, ``--dtype``, ``--load-format`` ...) plus ``--model-shape``."""
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default=None,
                        help="Benchmark a public model's shape with random weights: writes its config.json "
                        "to a temporary directory and implies --load-format dummy --skip-tokenizer-init.")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1, help="Number of generated sequences per prompt.")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="Sampling temperature of every request (vLLM's benchmarks use 1.0; 0 is greedy).")
    parser.add_argument("--disable-detokenize", action="store_true",
                        help="Do not detokenize the outputs (detokenization is off anyway without a tokenizer).")
    parser.add_argument("--output-json", type=str, default=None, help="Write the results to this JSON file.")


def add_baseline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", choices=["hf"], default=None,
                        help="After our run, time Hugging Face transformers generate() on the same weights, "
                        "workload, dtype and device, and print the speedup.")


class ModelShape:
    """Context manager: for ``--model-shape``, a temporary model directory wired into ``args``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> ModelShape:
        args = self.args
        if args.model_shape is None:
            return self
        if getattr(args, "model", None):
            raise ValueError("--model-shape and --model are exclusive: the shape stands in for the model.")
        if getattr(args, "load_format", "dummy") != "dummy":
            raise ValueError("--model-shape has only a config.json, so it needs --load-format dummy.")
        self._tmp = tempfile.TemporaryDirectory(prefix=f"aphrodite-{args.model_shape}-")
        args.model = str(write_model_shape(args.model_shape, self._tmp.name))
        args.load_format = "dummy"
        args.skip_tokenizer_init = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine arguments the user gave (``add_cli_args`` leaves the others out of ``args``)."""
    return {name: getattr(args, name) for name in EngineArgs.field_names() if hasattr(args, name)}


def start_engine(args: argparse.Namespace) -> tuple[LLM, float]:
    """``LLM(...)`` from the command line and the seconds it took to be ready."""
    from aphrodite.endpoints.llm import LLM
    start = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    seconds = time.perf_counter() - start
    print(f"Engine start-up: {seconds:.2f} s", flush=True)
    return llm, seconds


@dataclass
class ResolvedModel:
    """The model exactly as the engine resolved it, kept so the HF baseline loads the same thing
    after the engine (and its KV cache) has been freed."""

    name: str
    path: str
    gguf_file: str | None
    load_format: str
    hf_config: Any
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    seed: int
    has_tokenizer: bool


def resolved_model(llm: LLM) -> ResolvedModel:
    config = llm.llm_engine.config
    m = config.model
    return ResolvedModel(name=m.model, path=m.path, gguf_file=m.gguf_file, load_format=m.load_format,
                         hf_config=m.hf_config, dtype=m.dtype, device=config.device,
                         max_model_len=m.max_model_len, seed=m.seed, has_tokenizer=llm.get_tokenizer() is not None)


def free_device_memory() -> None:
    """Return freed engine memory (weights, KV cache) to the device so the HF baseline fits.

    Call it after dropping the last reference to the ``LLM``.
    """
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def safe_token_range(vocab_size: int) -> tuple[int, int]:
    """``[low, high)`` of prompt token ids, away from the special tokens at either end."""
    if vocab_size > 4 * _SAFE_ID_MARGIN:
        return _SAFE_ID_MARGIN, vocab_size - _SAFE_ID_MARGIN
    return 0, vocab_size


def random_token_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random prompts of exactly ``input_len`` token ids (vLLM's random dataset, without
    the detokenize/retokenize round trip, so no tokenizer is needed and the length is exact)."""
    import numpy as np
    low, high = safe_token_range(vocab_size)
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=(num_prompts, input_len)).tolist()


def check_lengths(model: ResolvedModel, input_len: int, output_len: int) -> None:
    if input_len < 1 or output_len < 1:
        raise ValueError(f"--input-len and --output-len must be at least 1, got {input_len} and {output_len}.")
    if input_len + output_len > model.max_model_len:
        raise ValueError(f"--input-len + --output-len ({input_len + output_len}) is more than max_model_len "
                         f"({model.max_model_len}); raise --max-model-len.")


def count_tokens(outputs: list[RequestOutput]) -> tuple[int, int]:
    """(prompt tokens, output tokens) actually processed, counted from the results like vLLM."""
    prompt = sum(len(o.prompt_token_ids or ()) for o in outputs)
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return prompt, generated


def write_json(path: str, results: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=4)
    print(f"Results written to {path}")


def workload_params(args: argparse.Namespace, model: ResolvedModel):
    """The sampling parameters of every benchmark request: exactly ``--output-len`` tokens each."""
    from aphrodite.sampling_params import SamplingParams
    return SamplingParams(n=args.n, temperature=args.temperature, top_p=1.0, ignore_eos=True,
                          max_tokens=args.output_len,
                          detokenize=model.has_tokenizer and not args.disable_detokenize)


def record_speedup(results: dict[str, Any], hf: dict[str, Any], speedup: float) -> None:
    """Attach the HF baseline to ``results`` and print the ratio line."""
    results["hf_baseline"] = hf
    results["speedup_vs_hf"] = speedup
    print(f"Speedup vs HF: {speedup:.2f}x", flush=True)
