"""One process per rank on this host (``spawn``), torch.distributed between them.

Each step is pickled once and written once into a shared-memory ring (``ShmBroadcast``)
that every worker reads. Only the output rank (first tensor-parallel rank of the last
pipeline stage) answers, over its pipe; the other ranks answer only the start-up calls.

Failure: each worker beats a heartbeat (a timestamp in shared memory, from a thread) and
the engine waits on the result pipe together with every worker's process sentinel. A
worker that exits, reports an exception, or stops beating for ``hang_timeout_s`` seconds
fails the step with ``ExecutorDeadError``; the executor then stops every other rank. Workers
watch the engine's process the same way and exit when it is gone.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from aphrodite.config import EngineConfig
from aphrodite.distributed.parallel_state import disable_nvlink_multicast
from aphrodite.engine_args import EngineArgs
from aphrodite.executor.base import Executor, ExecutorDeadError, free_port, hang_timeout_s, step_timeout_s
from aphrodite.executor.shm_broadcast import BroadcastHandle, ShmBroadcast
from aphrodite.lora.request import LoRARequest
from aphrodite.worker.step_future import ModelRunnerOutput
from aphrodite.worker.step_plan import GrammarBitmask, StepPlan

logger = logging.getLogger(__name__)

_HEARTBEAT_S = 0.5
_PEER_GRACE_S = 0.5     # how long a rank's failure waits for news of a dead peer before being reported


class _Future:
    def __init__(self, executor: MultiprocExecutor, seq: int) -> None:
        self._executor = executor
        self._seq = seq

    def result(self) -> ModelRunnerOutput:
        return self._executor._result(self._seq)


class WorkerProcesses:
    """One spawned process per rank and the channels to them. They can start before the engine's
    configuration exists (``prestart_workers``): the processes import torch, the worker and Transformers'
    configuration classes while the engine resolves its configuration, then receive it (``start``)."""

    def __init__(self, world: int, device: str = "auto", parallel: tuple[int, int, bool] | None = None) -> None:
        self.world_size = world
        self.parallel = parallel
        disable_nvlink_multicast()          # inherited by every process spawned below
        ctx = mp.get_context("spawn")
        self.mq = ShmBroadcast.create(world, ctx)
        self.heartbeats = ctx.Array("d", world, lock=False)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self._config_conns: list[Connection] = []
        for rank in range(world):
            reader, writer = ctx.Pipe(duplex=False)
            config_reader, config_writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker_main, name=f"AphroditeWorker-{rank}", daemon=True,
                               args=(config_reader, rank, init_method, self.mq.handle, writer, self.heartbeats,
                                     _log_level(), device, parallel))
            proc.start()
            writer.close()
            config_reader.close()
            self.procs.append(proc)
            self.conns.append(reader)
            self._config_conns.append(config_writer)
        self._started = False
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.mq, self._config_conns)

    def start(self, config: EngineConfig) -> None:
        """Send every rank the configuration it builds itself from (a rank already gone shows up as dead
        when the executor waits for it)."""
        self._started = True
        for conn in self._config_conns:
            try:
                conn.send(config)
            except OSError:
                pass
            conn.close()

    def shutdown(self) -> None:
        """Stop the processes; ones never sent a configuration hold nothing yet and are terminated at once."""
        if not self._started:
            for proc in self.procs:
                proc.terminate()
        self._finalizer()


def prestart_workers(args: EngineArgs) -> WorkerProcesses | None:
    """The worker processes of a multi-process engine, started before ``create_engine_config`` resolves
    ``args`` (which imports Transformers and reads the model's config, seconds on a cold start), or None
    when the engine will not run on this host's processes. ``APHRODITE_PRESTART_WORKERS=0`` turns it off."""
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    backend = args.distributed_executor_backend
    if world <= 1 or backend not in (None, "mp") or os.environ.get("APHRODITE_PRESTART_WORKERS", "1") == "0":
        return None
    # No CUDA query here (the driver's first initialisation takes seconds on a fresh machine): when the
    # configuration picks Ray after all (more ranks than GPUs), ``create_executor`` stops these processes.
    return WorkerProcesses(world, args.device, (args.tensor_parallel_size, args.pipeline_parallel_size,
                                                bool(args.disable_custom_all_reduce)))


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, workers: WorkerProcesses | None = None) -> None:
        self.world_size = world = config.parallel.world_size
        par = config.parallel
        parallel = (par.tensor_parallel_size, par.pipeline_parallel_size, par.disable_custom_all_reduce)
        if workers is not None and (workers.world_size != world or workers.parallel != parallel):
            workers.shutdown()
            workers = None
        self.workers = workers if workers is not None else WorkerProcesses(world, config.device.type, parallel)
        self.workers.start(config)
        self._dead: ExecutorDeadError | None = None
        self.mq, self.heartbeats = self.workers.mq, self.workers.heartbeats
        self.procs, self.conns = self.workers.procs, self.workers.conns
        self._finalizer = self.workers._finalizer
        self._sent = 0                  # steps written
        self._received = 0              # step results read
        self._results: dict[int, ModelRunnerOutput] = {}
        self.output_rank = -1           # known once every worker reported ready (``_wait_ready``)

    def _wait_ready(self) -> None:
        """Wait for every worker to have built its rank (the engine does its own start-up meanwhile)."""
        if self.output_rank >= 0:
            return
        ready = [self._recv(rank, timeout=step_timeout_s()) for rank in range(self.world_size)]
        self.output_rank = next(rank for rank, is_output in enumerate(ready) if is_output)
        logger.info("Started %d worker processes (output rank %d)", self.world_size, self.output_rank)

    # ---- calls on every rank ---------------------------------------------------
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        self._check()
        self._wait_ready()
        self.mq.enqueue((method, args), self._alive)
        answers, error = [], None
        for rank in range(self.world_size):   # read every rank's answer before raising one's exception
            try:
                answers.append(self._recv(rank, timeout=step_timeout_s()))
            except ExecutorDeadError:
                raise
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
        return answers

    def determine_num_blocks(self) -> int:
        return min(self._call_all("determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call_all("initialize_kv_cache", num_blocks)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self._add_lora_on_ranks(self._call_all_between_steps, lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._call_all_between_steps("remove_lora", lora_int_id)[0]

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        return self._call_all_between_steps(method, *args)

    def _call_all_between_steps(self, method: str, *args: Any) -> list[Any]:
        """``_call_all`` while steps may be in flight: their results (which the output rank sends
        first) are read and kept for their futures, so the call's answers are not mixed up with them."""
        while self._received < self._sent:
            self._check()
            self._received += 1
            self._results[self._received] = self._recv(self.output_rank, timeout=step_timeout_s())
        return self._call_all(method, *args)

    # ---- steps -------------------------------------------------------------------
    def execute_async(self, plan: StepPlan) -> _Future:
        self._check()
        self._wait_ready()
        try:
            self.mq.enqueue(plan, self._alive)
        except ExecutorDeadError:
            raise
        except BaseException as e:
            self._fail(f"Sending a step to the workers failed: {type(e).__name__}: {e}")
        self._sent += 1
        return _Future(self, self._sent)

    def sample_async(self, mask: GrammarBitmask) -> None:
        self._check()
        try:
            self.mq.enqueue(mask, self._alive)
        except ExecutorDeadError:
            raise
        except BaseException as e:
            self._fail(f"Sending a grammar bitmask to the workers failed: {type(e).__name__}: {e}")

    def _result(self, seq: int) -> ModelRunnerOutput:
        while seq not in self._results:
            self._check()
            self._received += 1
            self._results[self._received] = self._recv(self.output_rank, timeout=step_timeout_s())
        return self._results.pop(seq)

    # ---- receiving, with failure detection -------------------------------------------------
    def _recv(self, rank: int, timeout: float) -> Any:
        """The next message from ``rank``; raises ExecutorDeadError when any worker died or hung."""
        conn = self.conns[rank]
        deadline = time.monotonic() + timeout
        sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
        while True:
            ready = wait([conn, *sentinels], timeout=min(_HEARTBEAT_S, max(0.0, deadline - time.monotonic())))
            if conn in ready:
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    self._fail(self._death_message(rank))
                if kind == "error":
                    # A rank whose peer died fails inside a collective, often before the engine sees the
                    # death: name the dead peer (the cause) when one goes down within a moment.
                    others = {p.sentinel: i for i, p in enumerate(self.procs) if i != rank}
                    dead = wait(list(others), timeout=_PEER_GRACE_S) if others else []
                    if dead:
                        self._fail(f"{self._death_message(others[dead[0]])}; rank {rank} failed with it:\n{payload}")
                    self._fail(f"Worker rank {rank} failed:\n{payload}")
                if kind == "exception":
                    raise payload
                return payload
            for s in ready:
                self._fail(self._death_message(sentinels[s]))
            self._alive()
            if time.monotonic() > deadline:
                self._fail(f"Worker rank {rank} did not answer within {timeout:.0f} s "
                           "(APHRODITE_EXECUTE_TIMEOUT_S).")

    def _alive(self) -> None:
        """Raise when a worker has exited or stopped beating its heartbeat."""
        now = time.monotonic()
        limit = hang_timeout_s()
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._fail(self._death_message(rank))
            beat = self.heartbeats[rank]
            if beat and now - beat > limit:
                self._fail(f"Worker rank {rank} (pid {proc.pid}) has been unresponsive for {now - beat:.1f} s "
                           f"(no heartbeat within APHRODITE_WORKER_HANG_TIMEOUT_S={limit:g}).")

    def _death_message(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(0.2)
        detail = ""
        try:  # a worker that raised sends its traceback before exiting
            while self.conns[rank].poll():
                kind, payload = self.conns[rank].recv()
                if kind == "error":
                    detail = f":\n{payload}"
        except (EOFError, OSError):
            pass
        return f"Worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}{detail}"

    def _fail(self, message: str) -> None:
        error = ExecutorDeadError(message)
        logger.error("%s; shutting down the other ranks.", message)
        self.shutdown()
        self._dead = error
        raise error

    def _check(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(f"The workers are gone: {self._dead}")

    def shutdown(self) -> None:
        if self._dead is None:
            self._dead = ExecutorDeadError("The executor has shut down.")
        self._finalizer()


def _stop_workers(procs: list[Any], mq: ShmBroadcast, config_conns: list[Connection]) -> None:
    """Ask the workers to leave (also when the engine is garbage-collected or the interpreter exits),
    give them a moment, then terminate and finally kill them."""
    for conn in config_conns:   # a rank still waiting for its configuration reads the end and exits
        conn.close()
    polite = all(p.is_alive() for p in procs)   # else the survivors may be stuck waiting on the lost rank
    if polite:
        deadline = time.monotonic() + 1.0

        def give_up() -> None:
            if time.monotonic() > deadline:
                raise TimeoutError

        try:  # a full ring (a stuck reader) is not waited on for long
            mq.enqueue(("shutdown", ()), give_up)
        except Exception:
            pass
    deadline = time.monotonic() + (3.0 if polite else 0.2)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(1.0)
        if p.is_alive():
            p.kill()
            p.join(1.0)
    mq.close()


def _picklable(e: Exception) -> Exception:
    """``e`` itself when it survives pickling, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


# ---- the worker process ---------------------------------------------------------------
def _import_config_classes() -> None:
    """Transformers' configuration machinery, which unpickling the model's config needs (most of the
    seconds its first import takes), loaded while the engine still resolves the configuration."""
    try:
        import transformers.configuration_utils  # noqa: F401
        import transformers.utils.type_validators  # noqa: F401
    except ImportError:   # another Transformers version: unpickling imports what it needs
        pass


def _beat(heartbeats: Any, rank: int) -> None:
    while True:
        heartbeats[rank] = time.monotonic()
        time.sleep(_HEARTBEAT_S / 2)


def _log_level() -> int | None:
    """The engine process's logging level when it shows log records (the CLI and server configure it),
    so that spawned workers log the same way; None leaves them unconfigured."""
    root, ours = logging.getLogger(), logging.getLogger("aphrodite")
    if root.handlers:
        return root.getEffectiveLevel()
    return ours.getEffectiveLevel() if ours.handlers else None


def worker_main(config_conn: Connection, rank: int, init_method: str, handle: BroadcastHandle,
                conn: Connection, heartbeats: Any, log_level: int | None = None, device: str = "auto",
                parallel: tuple[int, int, bool] | None = None) -> None:
    """A worker process: import what every rank needs (and, unless ``device`` (the engine argument) is
    "cpu", set up CUDA on GPU ``rank`` when there is one), join the groups (``parallel``: tensor- and
    pipeline-parallel sizes, custom all-reduce off), receive the engine's configuration, build the rank,
    then run every message the engine broadcasts."""
    started = time.time()
    if log_level is not None:
        logging.basicConfig(level=log_level,
                            format=f"%(levelname)s %(asctime)s [rank {rank}] %(name)s: %(message)s")
    disable_nvlink_multicast()
    heartbeats[rank] = time.monotonic()
    threading.Thread(target=_beat, args=(heartbeats, rank), daemon=True, name="heartbeat").start()
    parent = mp.parent_process()

    def engine_alive() -> None:
        if parent is not None and not parent.is_alive():
            raise SystemExit("The engine process is gone.")

    try:
        import torch

        from aphrodite.worker.profiler import mark_startup
        from aphrodite.worker.worker import Worker
        mark_startup("worker process running (spawned)", started)
        _import_config_classes()
        mark_startup("imported torch, the worker and Transformers")
        cuda = device != "cpu" and torch.cuda.is_available() and rank < torch.cuda.device_count()
        if cuda:
            torch.cuda.set_device(rank)   # the same device the configuration gives this rank
            torch.cuda.init()
            mark_startup("CUDA initialised (before the configuration came)")
        compile_pool = None
        if cuda and parallel is not None:   # on a cold Triton cache, compile processes import meanwhile
            from aphrodite.kernels.precompile import pool_if_cold
            compile_pool = pool_if_cold(max(1, (os.cpu_count() or 2) // (parallel[0] * parallel[1])))
        if parallel is not None:   # the groups need only the sizes: joined while the engine still configures
            from aphrodite.distributed.parallel_state import init_distributed
            tp, pp, no_custom = parallel
            init_distributed(tp * pp, rank, tp, pp, "nccl" if cuda else "gloo", init_method, rank if cuda else 0,
                             disable_custom_all_reduce=no_custom)
            mark_startup("joined the parallel groups (before the configuration came)")
        try:
            config: EngineConfig = config_conn.recv()
        except EOFError:   # the engine stopped before it had a configuration to send
            os._exit(0)
        config_conn.close()
        mark_startup("received the configuration")
        if config.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.world_size))
        worker = Worker(config, rank, rank if config.device.type == "cuda" else 0, init_method,
                        compile_pool if config.device.type == "cuda" else None)
        mq = ShmBroadcast.attach(handle, rank, spin_s=0.05 if config.device.type == "cuda" else 1e-4)
        conn.send(("result", worker.is_output_rank))
        # With async scheduling the engine queues step N+1 before it reads step N: the output rank
        # queues N+1 on the device before it waits for N's results, and delivers N early only once the
        # device is done with it and nothing new has come. Without it, results go back at once.
        overlap = config.async_scheduling
        pending = None
        while True:
            if pending is not None:
                while not mq.ready() and not pending.done():
                    os.sched_yield()
                if not mq.ready():
                    conn.send(("result", pending.result()))
                    pending = None
            msg = mq.dequeue(engine_alive)
            if isinstance(msg, (StepPlan, GrammarBitmask)):
                # A plan with grammar_pending queues its forward pass only (no future); its bitmask
                # message follows and samples it.
                future = worker.execute(msg) if isinstance(msg, StepPlan) else worker.sample(msg)
                if pending is not None:
                    conn.send(("result", pending.result()))
                    pending = None
                if future is not None and worker.is_output_rank:
                    if overlap:
                        pending = future
                    else:
                        conn.send(("result", future.result()))
                continue
            if pending is not None:
                conn.send(("result", pending.result()))
                pending = None
            method, args = msg
            if method == "shutdown":
                break
            try:
                answer = ("result", getattr(worker, method)(*args))
            except Exception as e:  # a call that failed (not a broken rank): the caller gets the exception
                answer = ("exception", _picklable(e))
            conn.send(answer)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)
    worker.shutdown()
    # Leave without the interpreter's teardown: gloo's background threads can abort it after all work is done.
    os._exit(0)
