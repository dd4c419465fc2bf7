"""The in-process executor: one rank, in the engine's own process."""
from __future__ import annotations

from typing import Any

from aphrodite.config import EngineConfig
from aphrodite.executor.base import Executor
from aphrodite.lora.request import LoRARequest
from aphrodite.worker.model_runner import ModelRunnerOutput, StepFuture
from aphrodite.worker.step_plan import GrammarBitmask, StepPlan
from aphrodite.worker.worker import Worker


class _Deferred:
    """The future of a step whose sampler waits for its grammar bitmask (``sample_async``)."""

    def __init__(self) -> None:
        self.future: StepFuture | None = None

    def result(self) -> ModelRunnerOutput:
        if self.future is None:
            raise RuntimeError("The step's grammar bitmask was never sent (sample_async).")
        return self.future.result()


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)
        self.runner = self.worker.runner
        self._deferred: _Deferred | None = None

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        return self.worker.execute(plan).result()

    def execute_async(self, plan: StepPlan) -> StepFuture | _Deferred:
        """Queue the step; its results are read from the returned future later."""
        future = self.worker.execute(plan)
        if future is None:      # grammar_pending: the sampler runs in sample_async
            self._deferred = future = _Deferred()
        return future

    def sample_async(self, mask: GrammarBitmask) -> None:
        deferred, self._deferred = self._deferred, None
        future = self.worker.sample(mask)
        if deferred is not None:
            deferred.future = future

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.worker.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.worker.remove_lora(lora_int_id)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(*args)]
