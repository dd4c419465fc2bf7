"""CUDA graphs for decode steps and for one sequence's short prefill.

A forward pass of an 8B model is a few hundred kernel launches whose CPU cost rivals the GPU
work at small batch: decode at any batch, and a lone prompt's prefill, which is what a user
waits on for the first token (eagerly, ~12 ms of host time against ~5 ms of GPU work for 128
tokens on an H200). Each decode batch size on a ladder, and each prefill token count on a
shorter ladder, is captured once (largest first, so smaller graphs reuse its memory pool); a
step is padded up to the nearest captured size and replayed from the persistent input buffers.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from aphrodite.kernels.attention_metadata import AttentionMetadata
from aphrodite.kernels.precompile import compile_ahead
from aphrodite.modeling.layers.attention import set_attention_metadata

if TYPE_CHECKING:
    from aphrodite.worker.model_runner import HostBatch, ModelRunner

logger = logging.getLogger(__name__)

#: Largest prefill chunk replayed from a graph; past it the GPU work dwarfs the launches.
MAX_PREFILL_GRAPH_TOKENS = 512
#: With LoRA on, decode batches up to this size also get graphs without the LoRA kernels, replayed when
#: no token of the step uses an adapter (base-model requests keep the base model's latency).
MAX_PLAIN_LORA_BATCH = 32


#: Decode batches up to this size replay graphs. vLLM stops at 512 because its bigger batches still run
#: torch.compile'd code; ours would run the eager forward, whose Python and launches left the GPUs of
#: 2 x H200 idle 35-60% of a 1,000-sequence step (profile_workload_gpu.py). Covers the 1,024-sequence
#: default; ``APHRODITE_MAX_CUDAGRAPH_CAPTURE_SIZE`` moves it.
MAX_CAPTURE_SIZE = int(os.environ.get("APHRODITE_MAX_CUDAGRAPH_CAPTURE_SIZE", "1024"))


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond, capped at max_num_seqs
    and at ``MAX_CAPTURE_SIZE``."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    ladder = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 257, 16)) + list(range(288, 1025, 32))
    sizes = [s for s in ladder if s < top] + [top]
    return sorted(set(sizes))


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    """Powers of two from 16 up to ``min(max_tokens, MAX_PREFILL_GRAPH_TOKENS)``."""
    cap = min(max_tokens, MAX_PREFILL_GRAPH_TOKENS)
    return [s for s in (16, 32, 64, 128, 256, 512) if s <= cap]


class DecodeGraphs:
    """Decode-only steps at every captured batch size, and one-sequence prefill chunks."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        sc = runner.config.scheduler
        self.sizes = capture_sizes(sc.max_num_seqs)
        self.prefill_sizes = prefill_capture_sizes(sc.max_num_batched_tokens)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.plain_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.compiled_ahead = False    # ``dry_forwards`` ran under the start-up's compile_ahead

    def can_run(self, host: HostBatch) -> bool:
        if host.num_decodes == host.num_seqs:
            return bool(self.graphs) and host.num_seqs <= self.sizes[-1]
        return (bool(self.prefill_graphs) and host.num_seqs == 1 and host.from_prev is None
                and len(host.ids) <= self.prefill_sizes[-1])

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        inputs = self.runner.inputs
        if not self.compiled_ahead:    # the start-up's one round (ModelRunner._dry_start_up) did not run
            compile_ahead(self.dry_forwards, self.runner.compile_processes(), self.runner.compile_group(),
                          self.runner.compile_pool)
        self._empty_buffers()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for tokens in reversed(self.prefill_sizes):
                self.prefill_graphs[tokens] = self._capture_one(inputs.prefill_metadata(tokens), tokens, pool, stream)
            for batch in reversed(self.sizes):
                self.graphs[batch] = self._capture_one(inputs.decode_metadata(batch), batch, pool, stream)
            lora = self.runner.lora_manager
            if lora is not None:
                lora.state.active = False     # the layers skip LoRA while these are captured
                for batch in reversed([s for s in self.sizes if s <= MAX_PLAIN_LORA_BATCH]):
                    self.plain_graphs[batch] = self._capture_one(inputs.decode_metadata(batch), batch, pool, stream)
                lora.state.active = True
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("Captured %d decode CUDA graphs (batch 1..%d) and %d prefill graphs (up to %d tokens) in "
                    "%.1f s", len(self.sizes), self.sizes[-1], len(self.prefill_sizes),
                    self.prefill_sizes[-1] if self.prefill_sizes else 0, time.perf_counter() - start)

    def _empty_buffers(self) -> None:
        """Graph inputs that write nothing into the KV cache and read no context."""
        inputs = self.runner.inputs
        inputs.slots[1].fill_(-1)
        inputs.seq_lens[1].zero_()
        inputs.starts[1].zero_()

    def dry_forwards(self) -> None:
        """The forward of every graph about to be captured, run once outside capture: under
        ``compile_ahead`` it only collects the Triton kernels to compile in parallel."""
        self.compiled_ahead = True
        self._empty_buffers()
        inputs, model, lora = self.runner.inputs, self.runner.model, self.runner.lora_manager
        plain = [s for s in self.sizes if s <= MAX_PLAIN_LORA_BATCH] if lora is not None else []
        runs = ([(inputs.prefill_metadata(t), t, True) for t in self.prefill_sizes]
                + [(inputs.decode_metadata(b), b, True) for b in self.sizes]
                + [(inputs.decode_metadata(b), b, False) for b in plain])
        for meta, tokens, lora_on in runs:
            if lora is not None:
                lora.state.active = lora_on
            with set_attention_metadata(meta):
                model(inputs.ids[1][:tokens], inputs.pos[1][:tokens])
        if lora is not None:
            lora.state.active = True

    def _capture_one(self, meta: AttentionMetadata, tokens: int, pool: object,
                     stream: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs, model = self.runner.inputs, self.runner.model
        ids, pos = inputs.ids[1][:tokens], inputs.pos[1][:tokens]
        with set_attention_metadata(meta):
            model(ids, pos)        # warm-up: Triton compiles, allocator settles
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden = model(ids, pos)
        return graph, hidden

    def run(self, host: HostBatch) -> torch.Tensor:
        """Replay the smallest graph that fits; returns the hidden states of the real rows (tokens)."""
        n = len(host.ids)
        if host.num_decodes == host.num_seqs:
            size = next(s for s in self.sizes if s >= n)
            lora = self.runner.lora_manager
            plain = lora is not None and not lora.state.active and size in self.plain_graphs
            graph, hidden = (self.plain_graphs if plain else self.graphs)[size]
            self.runner.inputs.fill_decode(host, size)
        else:
            size = next(s for s in self.prefill_sizes if s >= n)
            graph, hidden = self.prefill_graphs[size]
            self.runner.inputs.fill_prefill(host, size)
        graph.replay()
        return hidden[:n]
