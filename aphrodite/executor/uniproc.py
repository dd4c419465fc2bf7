"""The in-process executor: the model runs in the engine's own process on one device."""
from __future__ import annotations

from aphrodite.config import EngineConfig
from aphrodite.engine.scheduler import SchedulerOutput
from aphrodite.lora.request import LoRARequest
from aphrodite.worker.model_runner import ModelRunner, ModelRunnerOutput, StepFuture


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def execute_async(self, sched: SchedulerOutput) -> StepFuture:
        """Queue the step; its results are read from the returned future later."""
        return self.runner.queue(sched)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.runner.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.remove_lora(lora_int_id)
