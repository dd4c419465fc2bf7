"""``LLM.start_profile()`` / ``stop_profile()`` on every rank: where a rank's step time goes.

Each rank runs torch.profiler between the two calls and answers with a short summary (wall
time, device-kernel time and launch count, the top kernels), so a missed latency or scaling
target can be split into kernel time, launch gaps and host work without copying traces
around. With ``APHRODITE_TORCH_PROFILER_DIR`` set (vLLM's ``VLLM_TORCH_PROFILER_DIR``), each
rank also writes its Chrome trace there.

Start-up is accounted for the same way: each rank stamps its phases (``mark_startup``) with the wall
clock, which every process of the host shares, and ``Worker.startup_timeline()`` returns them, so a
slow ``LLM()`` can be split into process start, imports, joining the groups, loading, compiling and
capturing per rank (``benchmarks/gpu/check_cold_start.py`` prints it).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

#: This process's start-up phases: (name, wall-clock time when it ended), in order.
STARTUP: list[tuple[str, float]] = []


def mark_startup(phase: str, at: float | None = None) -> None:
    """Record that ``phase`` of this rank's start-up ended now (or at wall-clock time ``at``)."""
    STARTUP.append((phase, time.time() if at is None else at))


GAP_US = 50      # the shortest idle stretch counted as a gap (a launch costs the host a few microseconds)


@dataclass
class ProfileSummary:
    rank: int
    wall_s: float
    kernel_s: float          # summed device time of every kernel (CPU: summed op self time)
    kernels: int             # kernel launches (CPU: op calls)
    table: str               # the top ops by self device time
    idle_s: float = 0.0      # device time with no kernel running, between the window's first and last kernel
    gaps: int = 0            # idle stretches of at least GAP_US within that span

    def __str__(self) -> str:
        idle = f", idle {self.idle_s * 1e3:.1f} ms in {self.gaps} gaps >= {GAP_US} us" if self.gaps else ""
        return (f"rank {self.rank}: wall {self.wall_s * 1e3:.1f} ms, kernels {self.kernel_s * 1e3:.1f} ms "
                f"({self.kernel_s / max(self.wall_s, 1e-9):.0%} busy){idle}, {self.kernels} launches\n{self.table}")


def device_idle(intervals: list[tuple[float, float]], min_gap_us: float = GAP_US) -> tuple[float, int]:
    """(idle seconds, count) of the stretches of at least ``min_gap_us`` between kernel intervals (microsecond
    start/end pairs, any order, overlaps allowed): the time the device waited for the host, which summed
    kernel time cannot show when a step is late rather than slow."""
    idle, gaps, end = 0.0, 0, None
    for start, stop in sorted(intervals):
        if end is not None and start - end >= min_gap_us:
            idle += start - end
            gaps += 1
        end = stop if end is None else max(end, stop)
    return idle / 1e6, gaps


class RankProfiler:
    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._prof: profile | None = None
        self._t0 = 0.0

    def start(self) -> None:
        if self._prof is not None:
            raise RuntimeError("The profiler is already running; call stop_profile() first.")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities)
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def stop(self) -> ProfileSummary:
        if self._prof is None:
            raise RuntimeError("The profiler is not running; call start_profile() first.")
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        trace_dir = os.environ.get("APHRODITE_TORCH_PROFILER_DIR")
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(trace_dir, f"rank{self.rank}.json"))
        events = prof.key_averages()
        if self.cuda:
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.self_device_time_total for e in kernels) / 1e6
            launches = sum(e.count for e in kernels)
            sort_by = "self_device_time_total"
            idle, gaps = device_idle([(e.time_range.start, e.time_range.end) for e in prof.events()
                                      if e.device_type == torch.autograd.DeviceType.CUDA])
        else:
            busy = sum(e.self_cpu_time_total for e in events) / 1e6
            launches = sum(e.count for e in events)
            sort_by = "self_cpu_time_total"
            idle, gaps = 0.0, 0
        table = events.table(sort_by=sort_by, row_limit=15, max_name_column_width=70)
        return ProfileSummary(self.rank, wall, busy, launches, table, idle, gaps)
