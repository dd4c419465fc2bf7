"""The executor interface: where the ranks run, and how one step reaches all of them.

The engine hands an executor one ``StepPlan`` per step and gets back a future whose
``result()`` is the output rank's ``ModelRunnerOutput``. Executors differ only in where the
``Worker`` s live: in the engine's process (``uni``), in one spawned process per rank on this
host (``mp``), or in one Ray actor per rank (``ray``).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from aphrodite.config import EngineConfig
from aphrodite.lora.request import LoRARequest
from aphrodite.worker.step_future import ModelRunnerOutput
from aphrodite.worker.step_plan import GrammarBitmask, StepPlan


class ExecutorDeadError(RuntimeError):
    """A worker died, hung or failed: the executor has shut its ranks down and runs nothing more."""


class ResultFuture(Protocol):
    def result(self) -> ModelRunnerOutput: ...


class Executor:
    """Runs the ranks of one engine. Subclasses implement the four hooks below."""

    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the smallest rank's count)."""
        raise NotImplementedError

    def initialize_kv_cache(self, num_blocks: int) -> None:
        raise NotImplementedError

    def execute_async(self, plan: StepPlan) -> ResultFuture:
        """Send the step to every rank; read its results from the returned future later."""
        raise NotImplementedError

    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        return self.execute_async(plan).result()

    def sample_async(self, mask: GrammarBitmask) -> None:
        """Send the grammar bitmask of the step last sent with ``grammar_pending``: every rank has queued
        its forward pass and samples once this arrives; the step's future (from ``execute_async``)
        answers after that. The next step may be sent only after this."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop every rank; safe to call more than once."""

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load a LoRA adapter on every rank (each reads its shard from the path); ``ValueError`` if it
        cannot be served; False when the id is loaded already."""
        raise NotImplementedError

    def remove_lora(self, lora_int_id: int) -> bool:
        raise NotImplementedError

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Every rank's ``Worker.method(*args)``, in rank order, run between steps (vLLM's name)."""
        raise NotImplementedError

    @staticmethod
    def _add_lora_on_ranks(call_all: Callable[..., list[Any]], lora_request: LoRARequest) -> bool:
        """``add_lora`` through ``call_all(method, *args)`` (every rank's answer): ranks answer
        ``Worker.add_lora_or_error``, since an exception would end a worker; the first error is raised
        here as the ValueError it was, after the ranks that did load the adapter drop it again."""
        results = call_all("add_lora_or_error", lora_request)
        error = next((e for _, e in results if e is not None), None)
        if error is not None:
            call_all("remove_lora", lora_request.lora_int_id)
            raise ValueError(error)
        return results[0][0]


def hang_timeout_s() -> float:
    """Seconds without a heartbeat after which a worker counts as hung."""
    return float(os.environ.get("APHRODITE_WORKER_HANG_TIMEOUT_S", "15"))


def step_timeout_s() -> float:
    """Longest a single step may take before the run is declared stuck."""
    return float(os.environ.get("APHRODITE_EXECUTE_TIMEOUT_S", "600"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_executor(config: EngineConfig, workers: Any = None) -> Executor:
    """The executor ``config.parallel.distributed_executor_backend`` names. ``workers``: processes from
    ``multiproc.prestart_workers``, which an mp executor takes over (and any other one stops)."""
    backend = config.parallel.distributed_executor_backend
    if workers is not None and backend != "mp":
        workers.shutdown()
        workers = None
    if backend == "uni":
        from aphrodite.executor.uniproc import UniProcExecutor
        return UniProcExecutor(config)
    if backend == "mp":
        from aphrodite.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config, workers)
    if backend == "ray":
        from aphrodite.executor.ray_executor import RayExecutor
        return RayExecutor(config)
    raise ValueError(f"Unknown distributed_executor_backend {backend!r}; choose mp, ray or uni.")
