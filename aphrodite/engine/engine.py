"""The synchronous engine: requests in, one scheduled step at a time, RequestOutputs out.

With async scheduling (``EngineConfig.async_scheduling``) each ``step()`` schedules and
queues step N+1 before it reads step N's sampled tokens, so the host's scheduling and input
building overlap the device's work; the outputs a call returns are those of the step before.
A structured-output request's token bitmask needs the token still in flight, so such a step is
sent with ``grammar_pending``: the device runs its forward pass while the engine absorbs step N,
advances the grammars and fills the mask, which follows as a ``GrammarBitmask`` that only the
step's sampler waits for (vLLM's deferred structured-output sampling).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any

import numpy as np

from aphrodite.config import EngineConfig, create_engine_config
from aphrodite.engine.kv_cache import KVCacheManager
from aphrodite.engine.request import FINISHED_STATUSES as _FINISHED
from aphrodite.engine.request import Request, RequestStatus
from aphrodite.engine.scheduler import Scheduler, SchedulerOutput
from aphrodite.engine.stop_checker import check_stop_token, find_stop_string
from aphrodite.engine_args import EngineArgs
from aphrodite.executor.base import ResultFuture, create_executor
from aphrodite.lora.request import LoRARequest
from aphrodite.outputs import CompletionOutput, Logprob, RequestOutput
from aphrodite.sampling_params import SamplingParams
from aphrodite.worker.step_future import ModelRunnerOutput, PositionLogprobs
from aphrodite.worker.step_plan import GrammarBitmask, NewRequestData, StepPlan

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


class _Parent:
    """A user request: its prompt, its n (or best_of) sequences, and what to report."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 children: list[Request]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.children = children

    @property
    def finished(self) -> bool:
        for c in self.children:     # a loop, not all(generator): asked for every output of every step
            if c.status not in _FINISHED:
                return False
        return True


class LLMEngine:
    def __init__(self, config: EngineConfig, workers: Any = None) -> None:
        self.config = config
        # Worker processes (mp) load the model while this process loads the tokenizer; ``workers``: the
        # processes ``from_engine_args`` started before resolving the configuration.
        self.executor = create_executor(config, workers)
        try:
            self._start(config)
        except BaseException:
            self.executor.shutdown()
            raise

    def _start(self, config: EngineConfig) -> None:
        m = config.model
        self.tokenizer = None
        if not m.skip_tokenizer_init:
            from aphrodite.tokenization.tokenizer import get_tokenizer
            self.tokenizer = get_tokenizer(m.tokenizer, gguf_file=m.gguf_file if m.tokenizer == m.path else None,
                                           revision=m.tokenizer_revision)
        self.eos_token_ids = self._eos_ids()
        num_blocks = self.executor.determine_num_blocks()
        capacity = num_blocks * config.cache.block_size
        if capacity < config.scheduler.max_model_len:
            raise ValueError(f"The KV cache holds {capacity} tokens, fewer than max_model_len "
                             f"({config.scheduler.max_model_len}); lower max_model_len or give the cache more memory.")
        self.executor.initialize_kv_cache(num_blocks)
        config.cache.num_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens = %d tokens of capacity", num_blocks,
                    config.cache.block_size, capacity)
        self.kv_cache = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                       sliding_window=config.model.sliding_window)
        # Pipeline stages: micro-batches of disjoint requests, up to one per stage in flight.
        pipeline = config.parallel.pipeline_parallel_size
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, skip_in_flight=pipeline > 1)
        self.parents: dict[str, _Parent] = {}
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(m.seed)
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.total_preemptions = 0
        self.async_scheduling = config.async_scheduling
        # Steps queued and not yet absorbed: one with plain scheduling, two with async scheduling (the
        # next step is queued before the last one's tokens are read), one per stage with pipelining.
        self._depth = pipeline if pipeline > 1 else 2 if self.async_scheduling else 1
        self._inflight: deque[tuple[SchedulerOutput, ResultFuture]] = deque()
        self._finished_ids: list[str] = []      # ended since the last plan: the workers drop them
        self._step_id = 0
        self.loras: dict[int, LoRARequest] = {}     # adapters the workers hold, by id
        self._unloading: set[int] = set()           # removed, dropped by the workers once unused
        # Structured output: the grammar compiler (made on first use) and requests whose grammar is
        # still compiling in its thread pool (they join the scheduler once it is ready).
        self._structured = None
        self._structured_lock = threading.Lock()
        self._grammar_waiting: list[tuple[Request, Future]] = []

    @classmethod
    def from_engine_args(cls, args: EngineArgs, usage_context: str = "llm") -> LLMEngine:
        # Multi-process ranks start importing torch while this process resolves the configuration.
        from aphrodite.executor.multiproc import prestart_workers
        workers = prestart_workers(args)
        try:
            config = create_engine_config(args, usage_context)
        except BaseException:
            if workers is not None:
                workers.shutdown()
            raise
        return cls(config, workers)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.config.model.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    # ---- structured output --------------------------------------------------------
    @property
    def structured_output(self):
        """The engine's ``StructuredOutputManager`` (xgrammar), built on first use; safe from any thread."""
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("Structured outputs need a tokenizer (skip_tokenizer_init=True is set).")
            with self._structured_lock:
                if self._structured is None:
                    from aphrodite.structured_output import StructuredOutputManager
                    # A private tokenizer copy: the engine thread keeps using its own concurrently.
                    # An in-process GPU worker copies the masks to the device straight from pinned buffers.
                    in_process_gpu = self.config.device.type == "cuda" and \
                        self.config.parallel.distributed_executor_backend == "uni"
                    self._structured = StructuredOutputManager(
                        copy.deepcopy(self.tokenizer), self.config.model.hf_config.vocab_size, self.eos_token_ids,
                        pin_memory=in_process_gpu)
        return self._structured

    def compile_structured_outputs(self, params: Iterable[SamplingParams]) -> None:
        """Compile every constraint in ``params`` (in parallel, cached); raises the first ``ValueError``.
        Lets a caller reject a bad schema or grammar before any request is added."""
        futures = [self.structured_output.submit(p.structured_outputs) for p in params
                   if p.structured_outputs is not None]
        for fut in futures:
            fut.result()

    def _admit_compiled(self, block: bool = False) -> list[RequestOutput]:
        """Move requests whose grammar finished compiling into the scheduler; a failed compile ends its
        request (aborted). ``block``: wait briefly for one when nothing else can run."""
        if not self._grammar_waiting:
            return []
        if block:
            wait_futures([f for _, f in self._grammar_waiting], timeout=0.05, return_when=FIRST_COMPLETED)
        still, failed = [], {}
        for req, fut in self._grammar_waiting:
            if not fut.done():
                still.append((req, fut))
            elif req.is_finished:
                continue
            elif fut.exception() is not None:
                logger.error("Request %s: %s", req.request_id, fut.exception())
                req.status = RequestStatus.FINISHED_ABORTED
                if (parent := self.parents.get(req.parent_id)) is not None:
                    failed[parent.request_id] = parent
            else:
                req.grammar = self.structured_output.matcher(fut.result())
                self.scheduler.add_request(req)
        self._grammar_waiting = still
        outputs = []
        for parent in failed.values():
            if parent.finished and (out := self._make_output(parent)) is not None:
                outputs.append(out)
                del self.parents[parent.request_id]
                for c in parent.children:
                    self.requests.pop(c.request_id, None)
        return outputs

    def _grammar_rows(self, sched: SchedulerOutput) -> list[int]:
        """Rows of ``sched`` (before it advances) where a constrained request samples: they need its mask."""
        if self._structured is None:    # no grammar was ever compiled: no request is constrained
            return []
        return [i for i, (r, n) in enumerate(zip(sched.requests, sched.num_tokens))
                if r.grammar is not None and r.num_computed_tokens + n == r.num_tokens_with_pending]

    def _grammar_bitmask(self, sched: SchedulerOutput, rows: list[int]) -> np.ndarray | None:
        """The token bitmask of ``sched`` from its constrained rows' grammars, which must have accepted every
        token sampled before this step. Rows of requests that ended meanwhile (their token of this step is
        dropped) and of grammars that are complete or failed stay all ones; None when no row is left. The
        array is the manager's reused buffer: sending the step copies it."""
        reqs = sched.requests
        rows = [i for i in rows if not reqs[i].is_finished and not reqs[i].grammar.failed
                and not reqs[i].grammar.terminated]
        if not rows:
            return None
        return self.structured_output.batch_bitmask(len(reqs), rows, [reqs[i].grammar for i in rows])

    # ---- requests ---------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError("A prompt dict needs 'prompt' (text) or 'prompt_token_ids'.")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("Text prompts need a tokenizer; with skip_tokenizer_init=True pass token ids.")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"Unsupported prompt type: {type(prompt).__name__}")

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Reject what the engine cannot serve before any work starts; raises ValueError."""
        max_len = self.config.scheduler.max_model_len
        vocab = self.config.model.hf_config.vocab_size
        if not prompt_ids:
            raise ValueError("The prompt is empty; it must contain at least one token.")
        if len(prompt_ids) >= max_len:
            raise ValueError(f"The prompt is {len(prompt_ids)} tokens long, but max_model_len is {max_len}: "
                             "prompt length must be less than max_model_len.")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"Prompt token ids must be in [0, {vocab}).")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {params.stop_token_ids}.")
        ids = {"logit_bias keys": [int(t) for t in params.logit_bias or ()],
               "allowed_token_ids": params.allowed_token_ids or (),
               "custom_token_bans": params.custom_token_bans or (),
               "dry_sequence_breaker_ids": params.dry_sequence_breaker_ids}
        for name, values in ids.items():
            if any(not 0 <= t < vocab for t in values):
                raise ValueError(f"{name} must be token ids in [0, {vocab}).")
        limit = self.config.model.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} must be at most {limit} (max_logprobs), got {value}.")
        if params.detokenize and self.tokenizer is None and params.stop:
            # Logprobs need none: without a tokenizer their decoded_token is None, as in vLLM.
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True).")
        if (params.bad_words or params.dry_sequence_breakers or params.structured_outputs) and self.tokenizer is None:
            raise ValueError("bad_words, dry_sequence_breakers and structured outputs need a tokenizer "
                             "(skip_tokenizer_init=True is set).")

    # ---- LoRA adapters ------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter into the worker (read and checked now: ``ValueError`` if it cannot serve);
        False when its id is loaded already."""
        if self.config.lora is None:
            raise ValueError("LoRA adapters need the engine started with enable_lora=True (--enable-lora).")
        if lora_request.lora_int_id in self._unloading:
            raise ValueError(f"LoRA adapter id {lora_request.lora_int_id} is still being unloaded; use another id.")
        known = self.loras.get(lora_request.lora_int_id)
        if known is not None:
            if (known.lora_name, known.lora_path) != (lora_request.lora_name, lora_request.lora_path):
                raise ValueError(f"lora_int_id {lora_request.lora_int_id} is already used by adapter "
                                 f"{known.lora_name!r} ({known.lora_path}).")
            return False
        self.executor.add_lora(lora_request)
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unload an adapter; False when it was not loaded. New requests cannot use it from now on;
        the worker drops it once the requests already running with it have finished."""
        if self.loras.pop(lora_int_id, None) is None:
            return False
        self._unloading.add(lora_int_id)
        self._flush_unloads()
        return True

    def _flush_unloads(self) -> None:
        if not self._unloading:
            return
        in_use = {r.lora_int_id for r in self.requests.values() if r.lora_int_id and not r.is_finished}
        for sched, _ in self._inflight:
            in_use.update(r.lora_int_id for r in sched.requests)
        for lora_int_id in self._unloading - in_use:
            self.executor.remove_lora(lora_int_id)
            self._unloading.discard(lora_int_id)

    def list_loras(self) -> set[int]:
        return set(self.loras)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.parents:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        text, prompt_ids = self.tokenize_prompt(prompt)
        self.validate(prompt_ids, params)
        if lora_request is not None:
            self.add_lora(lora_request)
        if params.bad_words or params.dry_sequence_breakers:
            params.update_from_tokenizer(self.tokenizer, self.config.model.hf_config.vocab_size)
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.structured_output.submit(params.structured_outputs)
            if grammar.done() and grammar.exception() is not None:
                raise grammar.exception()
        count = params.best_of or params.n
        children = []
        for i in range(count):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(63)
            child_params = params if i == 0 else dataclasses.replace(params, prompt_logprobs=None)
            cid = request_id if count == 1 else f"{i}_{request_id}"
            child = Request(cid, prompt_ids, child_params, seed, self.eos_token_ids, arrival_time, request_id,
                            lora_request)
            if params.best_of > params.n:
                child.cumulative_logprob = 0.0
            if self.tokenizer is not None and params.detokenize:
                from aphrodite.tokenization.detokenizer import IncrementalDetokenizer
                child.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens)
            children.append(child)
        parent = _Parent(request_id, text, prompt_ids, params, children)
        self.parents[request_id] = parent
        for child in children:
            self.requests[child.request_id] = child
            if grammar is None:
                self.scheduler.add_request(child)
            else:
                self._grammar_waiting.append((child, grammar))
        self._admit_compiled()

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests now and free their KV blocks."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            for child in parent.children:
                self.requests.pop(child.request_id, None)
                if not child.is_finished:
                    self._finish(child, RequestStatus.FINISHED_ABORTED)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        if req.sent_to_workers:
            self._finished_ids.append(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    # ---- the step --------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled forward pass; return outputs of the requests that progressed.

        ``finished_only`` skips building outputs of unfinished requests (offline batch use, where
        copying every running request's token list each step would cost O(batch x length)).
        With async scheduling the outputs are those of the previous call's step.
        """
        self._flush_unloads()
        early = self._admit_compiled(block=not self.scheduler.has_unfinished() and not self._inflight)
        if self._depth == 1:
            sched = self._schedule()
            if sched is None:
                return early
            sched.grammar_bitmask = self._grammar_bitmask(sched, self._grammar_rows(sched))
            result = self.executor.execute(self._plan(sched))
            self._advance(sched)
            return early + self._process(sched, result, finished_only)
        try:
            sched = self._schedule(allow_empty=bool(self._inflight))
            if sched is not None:
                # A constrained row whose last token is still in flight cannot have its mask yet: the step's
                # forward pass is sent now, and the mask once that token is in (below), before its sampler.
                grammar_rows = self._grammar_rows(sched)
                pending = bool(grammar_rows) and any(sched.requests[i].num_pending_tokens for i in grammar_rows)
                if grammar_rows and not pending:
                    sched.grammar_bitmask = self._grammar_bitmask(sched, grammar_rows)
                plan = self._plan(sched)
                plan.grammar_pending = pending
                self._inflight.append((sched, self.executor.execute_async(plan)))
                self._advance(sched)
                for r in sched.requests:
                    r.num_in_flight += 1
                if pending:
                    return early + self._process_then_mask(sched, grammar_rows, plan.step_id, finished_only)
                if len(self._inflight) < self._depth:
                    return early
            if not self._inflight:
                return early
            return early + self._process_oldest(finished_only)
        except BaseException:
            for prev, _ in self._inflight:
                for r in prev.requests:
                    r.num_in_flight -= 1
            self._inflight.clear()
            raise

    def _process_oldest(self, finished_only: bool) -> list[RequestOutput]:
        """Read and absorb the oldest step in flight."""
        prev, future = self._inflight.popleft()
        for r in prev.requests:
            r.num_in_flight -= 1
        return self._process(prev, future.result(), finished_only)

    def _process_then_mask(self, sched: SchedulerOutput, grammar_rows: list[int], step_id: int,
                           finished_only: bool) -> list[RequestOutput]:
        """``sched`` was sent with ``grammar_pending``: absorb every step before it (their tokens advance the
        grammars), then send its bitmask. The device runs its forward pass meanwhile; its sampler waits for
        the mask, which is sent even when absorbing fails, so the workers never wait for it in vain."""
        outputs: list[RequestOutput] = []
        mask = None
        try:
            while len(self._inflight) > 1:
                outputs += self._process_oldest(finished_only)
            mask = self._grammar_bitmask(sched, grammar_rows)
        finally:
            self.executor.sample_async(GrammarBitmask(step_id, mask))
        return outputs

    def shutdown(self) -> None:
        """Stop the executor's ranks (worker processes or actors); the engine runs nothing afterwards."""
        self.executor.shutdown()

    def _schedule(self, allow_empty: bool = False) -> SchedulerOutput | None:
        """The next step's batch, or None when there is nothing to run."""
        sched = self.scheduler.schedule()
        if not sched.requests:
            if self.scheduler.has_unfinished() and not allow_empty:
                raise RuntimeError("The scheduler could not fit any request into the KV cache.")
            return None
        self.total_preemptions += sched.num_preempted
        return sched

    def _plan(self, sched: SchedulerOutput) -> StepPlan:
        """The flat description of ``sched`` for the workers: new requests' data once, then deltas."""
        self._step_id += 1
        reqs = sched.requests
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_ids,
                        num_scheduled=sched.num_tokens, grammar_bitmask=sched.grammar_bitmask,
                        req_ids=[r.request_id for r in reqs],
                        num_computed=[r.num_computed_tokens for r in reqs],
                        num_pending=[r.num_pending_tokens for r in reqs],
                        num_kept_blocks=[r.num_sent_blocks for r in reqs])
        self._finished_ids = []
        num_new_blocks, new_block_ids = plan.num_new_blocks, plan.new_block_ids
        num_new_tokens, new_token_ids = plan.num_new_tokens, plan.new_token_ids
        for r in reqs:
            if not r.sent_to_workers:
                plan.new_requests.append(NewRequestData(r.request_id, r.prompt_token_ids, r.params,
                                                        r.sample_seed, r.eos_token_ids, r.lora_int_id))
                r.sent_to_workers = True
                r.num_sent_tokens = r.num_prompt_tokens
            blocks, sent = r.block_ids, r.num_sent_blocks
            n = len(blocks) - sent
            num_new_blocks.append(n)
            if n:
                new_block_ids.extend(blocks[sent:])
                r.num_sent_blocks = sent + n
            tokens, sent = r.all_token_ids, r.num_sent_tokens
            n = len(tokens) - sent
            num_new_tokens.append(n)
            if n:
                new_token_ids.extend(tokens[sent:])
                r.num_sent_tokens = sent + n
        return plan

    def _advance(self, sched: SchedulerOutput) -> None:
        """Bookkeeping once a step is queued: computed tokens, pending samples, prompt-token stats."""
        self.num_prompt_tokens += self.scheduler.update_after_step(sched)

    def _process(self, sched: SchedulerOutput, result: ModelRunnerOutput, finished_only: bool) -> list[RequestOutput]:
        """Absorb a finished step's results; requests that ended (or were aborted) before it are skipped,
        so a token sampled after a stop is dropped.

        This runs once per step over the whole batch, so a request that needs nothing but its new token
        and the stop checks (no logprobs, text, grammar) takes a short inline path; any other goes through
        ``_absorb``. With ``finished_only`` only the requests that ended can complete a user request, so
        only their parents are looked at."""
        sampled, logprobs = result.sampled, result.logprobs
        if self._structured is not None:
            self._accept_tokens(sched, sampled)
        prompt_lps = result.prompt_logprobs if any(result.prompt_logprobs) else None
        max_len = self.config.scheduler.max_model_len
        parents = self.parents
        touched: dict[str, _Parent] = {}
        ended: list[tuple[Request, RequestStatus]] = []
        generated = 0
        for i, req in enumerate(sched.requests):
            if req.status in _FINISHED:
                continue
            token = sampled[i]
            if token is None or logprobs[i] is not None or req.detokenizer is not None \
                    or (prompt_lps is not None and prompt_lps[i]):
                status = self._absorb(req, result, i)
                generated += token is not None
            else:
                if req.first_token_time is None:
                    req.first_token_time = time.monotonic()
                req.all_token_ids.append(token)     # Request.append_token, inline
                if req.num_pending_tokens:
                    req.num_pending_tokens -= 1
                generated += 1
                status = check_stop_token(req, token, max_len)
                if req.grammar is not None:     # its token was accepted by ``_accept_tokens``
                    status = self._grammar_status(req, token, status)
            if status is not None:
                ended.append((req, status))
            elif finished_only:
                continue
            parent = parents.get(req.parent_id)
            if parent is not None:
                touched[parent.request_id] = parent
        self.num_generated_tokens += generated
        if ended:
            self._finish_many(ended)
        outputs = []
        for parent in touched.values():
            if finished_only and not parent.finished:
                continue
            out = self._make_output(parent)
            if out is not None:
                outputs.append(out)
            if parent.finished:
                del self.parents[parent.request_id]
                for c in parent.children:
                    self.requests.pop(c.request_id, None)
        return outputs

    def _accept_tokens(self, sched: SchedulerOutput, sampled: list[int | None]) -> None:
        """Advance the grammars of the step's constrained requests with their new tokens, all at once (in
        parallel for a large batch) before ``_absorb`` looks at each request's result."""
        states, tokens = [], []
        for req, token in zip(sched.requests, sampled):
            grammar = req.grammar
            if grammar is not None and token is not None and req.status not in _FINISHED \
                    and grammar.num_accepted == req.num_output_tokens:
                states.append(grammar)
                tokens.append(token)
        if states:
            self.structured_output.accept_many(states, tokens)

    @staticmethod
    def _grammar_status(req: Request, token: int, status: RequestStatus | None) -> RequestStatus | None:
        """A constrained request's status after its new token: aborted when the grammar rejected it, stopped
        when it completed the grammar (else ``status``, from the stop checks)."""
        grammar = req.grammar
        if grammar.num_accepted < req.num_output_tokens:    # not accepted ahead by ``_accept_tokens``
            grammar.accept(token)
        if grammar.failed:
            return RequestStatus.FINISHED_ABORTED
        if status is None and grammar.terminated:
            return RequestStatus.FINISHED_STOPPED     # the grammar is complete
        return status

    def _finish_many(self, ended: list[tuple[Request, RequestStatus]]) -> None:
        """``_finish`` for each (request, status), in order."""
        self.scheduler.finish_many(ended)
        self._finished_ids.extend(r.request_id for r, _ in ended if r.sent_to_workers)

    def _absorb(self, req: Request, result: ModelRunnerOutput, i: int) -> RequestStatus | None:
        """Fold one request's step result into it: prompt logprobs, new token, text, stop checks.
        Returns the status to finish it with, or None while it goes on."""
        if result.prompt_logprobs and result.prompt_logprobs[i]:
            req.prompt_logprobs.extend(self._logprob_dict(e) for e in result.prompt_logprobs[i])
        token = result.sampled[i]
        if token is None:
            return None
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.append_token(token)
        entry = result.logprobs[i]
        if entry is not None:
            req.cumulative_logprob += entry[1]
            if req.logprobs is not None:
                req.logprobs.append(self._logprob_dict(entry))
        status = check_stop_token(req, token, self.config.scheduler.max_model_len)
        if req.grammar is not None:
            status = self._grammar_status(req, token, status)
        if req.detokenizer is not None:
            if status != RequestStatus.FINISHED_STOPPED or req.params.include_stop_str_in_output:
                status = self._append_text(req, req.detokenizer.step([token]), status)
            if status is not None and not isinstance(req.stop_reason, str):
                # Finishing: release text the detokenizer held back (e.g. an unfinished byte run).
                status = self._append_text(req, req.detokenizer.flush(), status)
        return status

    def _append_text(self, req: Request, new: str, status: RequestStatus | None) -> RequestStatus | None:
        """Add newly decoded text and look for stop strings in it; returns the (maybe new) status."""
        if not new:
            return status
        req.output_text += new
        p = req.params
        if p.stop and req.num_output_tokens >= p.min_tokens:
            hit = find_stop_string(req.output_text, len(new), p.stop, p.include_stop_str_in_output)
            if hit is not None:
                req.stop_reason, cut = hit
                req.output_text = req.output_text[:cut]
                return RequestStatus.FINISHED_STOPPED
        return status

    def _logprob_dict(self, entry: PositionLogprobs) -> dict[int, Logprob]:
        token, lp, rank, top = entry
        d = {tid: Logprob(v, r + 1, self._decode_one(tid)) for r, (tid, v) in enumerate(top)}
        d[token] = Logprob(lp, rank, self._decode_one(token))
        return d

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        """The parent's RequestOutput so far. Built for every running request every step when streaming, so
        it reads Request attributes directly (no properties) and passes arguments by position."""
        params = parent.params
        children = parent.children
        finished = parent.finished
        if params.best_of > params.n:
            if not finished:
                return None
            children = sorted(children, key=lambda c: c.cumulative_logprob, reverse=True)[:params.n]
        with_cumulative = params.logprobs is not None
        outs = [CompletionOutput(idx, c.output_text, c.all_token_ids[c.num_prompt_tokens:],
                                 c.cumulative_logprob if with_cumulative else None, c.logprobs,
                                 c.status.finish_reason if c.status in _FINISHED else None, c.stop_reason)
                for idx, c in enumerate(children)]
        first = parent.children[0]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_ids, outs, finished,
                             first.prompt_logprobs, first.num_cached_tokens,
                             {"arrival_time": first.arrival_time, "first_token_time": first.first_token_time})

