"""CUDA-event timers shared by the GPU benchmark scripts (run them as ``python3 benchmarks/gpu/X.py``)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def graph_us(fn: Callable[[], object], reps: int = 50) -> float:
    """Microseconds per call of ``fn``, replayed from one CUDA graph of ``reps`` calls, so launch
    overhead is left out (what a decode step's CUDA graph sees)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()                 # warm replay
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def eager_us(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Microseconds per call of ``fn`` launched eagerly ``iters`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters
