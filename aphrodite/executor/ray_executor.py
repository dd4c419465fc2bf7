"""One Ray actor per rank, placed by a placement group, for runs that span hosts.

The engine joins the Ray cluster that is already running (``ray start --head`` / ``ray start
--address=...``, or ``RAY_ADDRESS``) or, when none runs, starts a local one. Each step is
put into the object store once (``ray.put``) and every actor receives the same reference;
only the output rank's call returns results. A dead actor or a step past the timeout fails
the run with ``ExecutorDeadError`` and every other actor is killed.
"""
from __future__ import annotations

import logging
from typing import Any

from aphrodite.config import EngineConfig
from aphrodite.executor.base import Executor, ExecutorDeadError, step_timeout_s
from aphrodite.lora.request import LoRARequest
from aphrodite.worker.step_future import ModelRunnerOutput
from aphrodite.worker.step_plan import GrammarBitmask, StepPlan

logger = logging.getLogger(__name__)


class RayWorker:
    """The actor body: a ``Worker`` built on request (so rank 0's address can be looked up first)."""

    def __init__(self) -> None:
        from aphrodite.distributed.parallel_state import disable_nvlink_multicast
        disable_nvlink_multicast()
        self.worker: Any = None

    def address(self) -> tuple[str, int]:
        """(this node's IP, a free port on it): where rank 0 hosts the torch.distributed rendezvous."""
        import socket

        import ray
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init_worker(self, config: EngineConfig, rank: int, init_method: str) -> bool:
        import os

        import torch
        if config.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        from aphrodite.worker.worker import Worker
        # Ray gives each actor its own GPU through CUDA_VISIBLE_DEVICES: it is device 0 here.
        self.worker = Worker(config, rank, 0, init_method)
        return self.worker.is_output_rank

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)

    def execute(self, plan: StepPlan) -> ModelRunnerOutput | None:
        future = self.worker.execute(plan)     # None with grammar_pending: ``sample`` answers
        return future.result() if future is not None and self.worker.is_output_rank else None

    def sample(self, mask: GrammarBitmask) -> ModelRunnerOutput | None:
        future = self.worker.sample(mask)
        return future.result() if self.worker.is_output_rank else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()


class _Future:
    """Every actor's call of one step; the output rank answers in the last ``world`` of ``refs`` (a step
    that waited for its grammar bitmask has its ``execute`` calls first, then its ``sample`` calls)."""

    def __init__(self, executor: RayExecutor, refs: list[Any]) -> None:
        self._executor = executor
        self._refs = refs

    def result(self) -> ModelRunnerOutput:
        answers = self._executor._get(self._refs)
        return answers[len(answers) - len(self._executor.actors) + self._executor.output_rank]


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError:
            raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'ray[default]'.") from None
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            try:   # a cluster started with `ray start`, or RAY_ADDRESS
                ray.init(address="auto", logging_level=logging.WARNING)
            except ConnectionError:
                ray.init(logging_level=logging.WARNING)
                self._owns_ray = True
        world = config.parallel.world_size
        gpu = config.device.type == "cuda"
        resource = "GPU" if gpu else "CPU"
        available = ray.cluster_resources().get(resource, 0)
        if available < world:
            self._cleanup_ray()
            raise ValueError(f"The Ray cluster has {available:g} {resource}(s), but tensor_parallel_size x "
                             f"pipeline_parallel_size = {world} ranks need one each.")
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * world, strategy="PACK")
        self._dead: ExecutorDeadError | None = None
        self._deferred: _Future | None = None     # the step waiting for its grammar bitmask
        self.actors: list[Any] = []
        try:
            ray.get(self.pg.ready(), timeout=step_timeout_s())
            actor_cls = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0)(RayWorker)
            self.actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank)).remote() for rank in range(world)]
            ip, port = ray.get(self.actors[0].address.remote(), timeout=step_timeout_s())
            init_method = f"tcp://{ip}:{port}"
            ready = self._get([a.init_worker.remote(config, rank, init_method) for rank, a in enumerate(self.actors)])
        except BaseException:
            self.shutdown()
            raise
        self.output_rank = ready.index(True)
        logger.info("Started %d Ray actors (output rank %d)", world, self.output_rank)

    def _get(self, refs: list[Any]) -> list[Any]:
        if self._dead is not None:
            raise ExecutorDeadError(f"The workers are gone: {self._dead}")
        ray = self._ray
        try:
            return ray.get(refs, timeout=step_timeout_s())
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError) as e:
            error = ExecutorDeadError(f"A Ray worker failed: {type(e).__name__}: {e}")
            logger.error("%s; shutting down the other actors.", error)
            self.shutdown()
            self._dead = error
            raise error from None

    def determine_num_blocks(self) -> int:
        return min(self._get([a.call.remote("determine_num_blocks") for a in self.actors]))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._get([a.call.remote("initialize_kv_cache", num_blocks) for a in self.actors])

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Every actor's ``Worker.method(*args)``; an actor runs its calls in order, after its queued steps."""
        return self._get([a.call.remote(method, *args) for a in self.actors])

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return self._call_all(method, *args)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self._add_lora_on_ranks(self._call_all, lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._call_all("remove_lora", lora_int_id)[0]

    def execute_async(self, plan: StepPlan) -> _Future:
        if self._dead is not None:
            raise ExecutorDeadError(f"The workers are gone: {self._dead}")
        ref = self._ray.put(plan)            # one copy in the object store, shared by every actor
        future = _Future(self, [a.execute.remote(ref) for a in self.actors])
        self._deferred = future if plan.grammar_pending else None
        return future

    def sample_async(self, mask: GrammarBitmask) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(f"The workers are gone: {self._dead}")
        future, self._deferred = self._deferred, None
        ref = self._ray.put(mask)
        refs = [a.sample.remote(ref) for a in self.actors]
        if future is not None:
            future._refs = future._refs + refs

    def shutdown(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            return
        if self._dead is None:
            self._dead = ExecutorDeadError("The executor has shut down.")
            try:   # let the ranks leave their process groups before the actors go
                ray.get([a.shutdown.remote() for a in self.actors], timeout=5)
            except Exception:
                pass
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        try:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        except Exception:
            pass
        self._cleanup_ray()

    def _cleanup_ray(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
