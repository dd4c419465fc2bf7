"""The in-process executor: the model runs in the engine's own process on one device."""
from __future__ import annotations

from aphrodite.config import EngineConfig
from aphrodite.worker.model_runner import ModelRunner, ModelRunnerOutput, StepFuture
from aphrodite.worker.step_plan import StepPlan


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        return self.runner.execute(plan)

    def execute_async(self, plan: StepPlan) -> StepFuture:
        """Queue the step; its results are read from the returned future later."""
        return self.runner.queue(plan)
