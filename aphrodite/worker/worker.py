"""One rank: its device, its place in the tensor/pipeline-parallel groups, its model runner.

Every executor (in-process, one process per rank, Ray actors) drives the same ``Worker``
with the same ``StepPlan`` s. Which rank answers the engine is decided here: the first
tensor-parallel rank of the last pipeline stage (``is_output_rank``), the one that holds
sampled ids; the others run the same step and return nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from aphrodite.config import EngineConfig
from aphrodite.distributed.parallel_state import (
    destroy_distributed,
    disable_nvlink_multicast,
    get_pp_rank,
    get_tp_rank,
    init_distributed,
    is_last_pp_rank,
    model_parallel_is_initialized,
)
from aphrodite.kernels.precompile import CompilePool
from aphrodite.lora.request import LoRARequest
from aphrodite.worker.model_runner import ModelRunner, start_compile_pool
from aphrodite.worker.profiler import STARTUP, ProfileSummary, RankProfiler, mark_startup
from aphrodite.worker.step_future import StepFuture
from aphrodite.worker.step_plan import GrammarBitmask, StepPlan

logger = logging.getLogger(__name__)


def init_parallel_groups(config: EngineConfig, rank: int, local_rank: int, init_method: str) -> None:
    """Join torch.distributed (NCCL on GPUs, gloo on the CPU) and build the TP and PP groups."""
    par = config.parallel
    backend = "nccl" if config.device.type == "cuda" else "gloo"
    init_distributed(par.world_size, rank, par.tensor_parallel_size, par.pipeline_parallel_size, backend,
                     init_method, local_rank, disable_custom_all_reduce=par.disable_custom_all_reduce)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0,
                 init_method: str | None = None, compile_pool: CompilePool | None = None) -> None:
        disable_nvlink_multicast()
        self.rank = rank
        if config.device.type == "cuda":
            torch.cuda.set_device(local_rank)
            config = replace(config, device=torch.device("cuda", local_rank))
            if config.parallel.world_size > 1:
                torch.cuda.init()
                mark_startup("CUDA initialised")
        self.config = config
        # Started first, so that their imports overlap joining the groups and loading the model.
        compile_pool = compile_pool if compile_pool is not None else start_compile_pool(config)
        self.distributed = config.parallel.world_size > 1
        if self.distributed and not model_parallel_is_initialized():   # (a prestarted rank joined already)
            if init_method is None:
                raise ValueError("A worker of a multi-rank run needs an init_method.")
            start = time.perf_counter()
            init_parallel_groups(config, rank, local_rank, init_method)
            logger.info("Joined the parallel groups (world size %d) in %.1f s", config.parallel.world_size,
                        time.perf_counter() - start)
            mark_startup("joined the parallel groups (NCCL, custom all-reduce)")
        self.tp_rank, self.pp_rank = get_tp_rank(), get_pp_rank()
        self.is_output_rank = is_last_pp_rank() and self.tp_rank == 0
        self.runner = ModelRunner(config, compile_pool)
        self.profiler = RankProfiler(rank, config.device)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> StepFuture | None:
        """Queue one step; only the output rank's future carries results worth reading. None for a step
        with ``grammar_pending``: its future comes from ``sample``."""
        return self.runner.queue(plan, want_result=self.is_output_rank)

    def sample(self, mask: GrammarBitmask) -> StepFuture:
        """Sample the step that waited for its grammar bitmask."""
        return self.runner.sample(mask)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter into this rank's slots' host cache; ``ValueError`` if it cannot be served."""
        return self.runner.add_lora(lora_request)

    def add_lora_or_error(self, lora_request: LoRARequest) -> tuple[bool, str | None]:
        """``add_lora`` for worker processes: a bad adapter comes back as its message, since an exception
        would end the process."""
        try:
            return self.runner.add_lora(lora_request), None
        except ValueError as e:
            return False, str(e)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.remove_lora(lora_int_id)

    def tp_overlap(self, min_tokens: int | None = None) -> tuple[int, int]:
        """``ModelRunner.tp_overlap``: set the smallest step run as two overlapped halves (when given);
        returns it and how many steps ran so."""
        return self.runner.tp_overlap(min_tokens)

    def startup_timeline(self) -> list[tuple[str, float]]:
        """This rank's start-up phases so far: (name, wall-clock time it ended), in order."""
        return list(STARTUP)

    def start_profile(self) -> None:
        self.profiler.start()

    def stop_profile(self) -> ProfileSummary:
        return self.profiler.stop()

    def shutdown(self) -> None:
        if self.distributed:
            try:
                destroy_distributed()
            except Exception:  # a peer is already gone: nothing left to tear down cleanly
                logger.debug("destroy_distributed failed", exc_info=True)
