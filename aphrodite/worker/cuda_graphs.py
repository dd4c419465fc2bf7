"""CUDA graphs for decode steps.

A decode step of an 8B model is a few hundred kernel launches whose CPU cost rivals the GPU
work at small batch. Each decode batch size on a ladder is captured once (largest first, so
smaller graphs reuse its memory pool); a step is padded up to the nearest captured size and
replayed from the persistent input buffers.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from aphrodite.modeling.layers.attention import set_attention_metadata

if TYPE_CHECKING:
    from aphrodite.worker.model_runner import HostBatch, ModelRunner

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond, capped at max_num_seqs."""
    ladder = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 257, 16)) + list(range(288, 1025, 32))
    sizes = [s for s in ladder if s < max_num_seqs] + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.sizes = capture_sizes(runner.config.scheduler.max_num_seqs)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def can_run(self, host: HostBatch) -> bool:
        return bool(self.graphs) and host.num_decodes == host.num_seqs and host.num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        inputs, model = self.runner.inputs, self.runner.model
        ids, pos = inputs.ids[1], inputs.pos[1]
        inputs.slots[1].fill_(-1)          # capture writes nothing into the KV cache
        inputs.seq_lens[1].zero_()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for batch in reversed(self.sizes):
                meta = inputs.decode_metadata(batch)
                with set_attention_metadata(meta):
                    model(ids[:batch], pos[:batch])        # warm-up: Triton compiles, allocator settles
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        hidden = model(ids[:batch], pos[:batch])
                self.graphs[batch] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("Captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), self.sizes[-1],
                    time.perf_counter() - start)

    def run(self, host: HostBatch) -> torch.Tensor:
        """Replay the smallest graph that fits; returns the hidden states of the real rows."""
        n = host.num_seqs
        batch = next(s for s in self.sizes if s >= n)
        graph, hidden = self.graphs[batch]
        self.runner.inputs.fill_decode(host, batch)
        graph.replay()
        return hidden[:n]
