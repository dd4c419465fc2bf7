"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

Each step fills one token budget: running requests first (a decode costs one token, an
unfinished prefill continues with its next chunk), then new requests from the waiting
queue, each taking as many prompt tokens as the budget still allows. When the KV cache
cannot hold a running request's next tokens, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed later (its prefix often comes back from the prefix cache).

With async scheduling a step is scheduled before the previous step's sampled tokens are
known: those count as pending tokens (``Request.num_pending_tokens``), so a decode is
scheduled as usual and its input token is taken from the device.

With pipeline parallelism several micro-batches are in flight at once, one per stage; a
request already in one of them is skipped (``skip_in_flight``) until its results are back,
so the micro-batches hold disjoint requests and every input token is known to the host.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from aphrodite.config import SchedulerConfig
from aphrodite.engine.kv_cache import KVCacheManager
from aphrodite.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """This step's work: requests in batch order (one-token chunks first) and their token counts."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0
    # Structured output: [len(requests), ceil(vocab/32)] int32 token bitmask (bit set = allowed), filled
    # by the engine's grammar matchers; None when no scheduled request is constrained.
    grammar_bitmask: np.ndarray | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, skip_in_flight: bool = False) -> None:
        self.config = config
        # Pipeline parallelism: a request already in a queued micro-batch waits for its results.
        self.skip_in_flight = skip_in_flight
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv_cache.free(request)

    def finish_many(self, ended: list[tuple[Request, RequestStatus]]) -> None:
        """``finish`` for each (request, status) in order, with one pass over the running list instead of
        a search per request (a step where a whole batch ends would otherwise cost O(batch^2))."""
        if len(ended) < 8:
            for request, status in ended:
                self.finish(request, status)
            return
        gone = {id(r) for r, _ in ended}
        kept = [r for r in self.running if id(r) not in gone]
        was_running = gone if len(kept) + len(gone) == len(self.running) else \
            {id(r) for r in self.running if id(r) in gone}
        self.running[:] = kept
        for request, status in ended:
            request.status = status
            if id(request) not in was_running:
                try:
                    self.waiting.remove(request)
                except ValueError:
                    pass
            self.kv_cache.free(request)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_sent_blocks = 0     # the workers drop the freed table with the next plan
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        out = SchedulerOutput()
        chosen: list[tuple[Request, int]] = []

        i = 0
        max_len = self.config.max_model_len
        running, kv_cache, skip_in_flight = self.running, self.kv_cache, self.skip_in_flight
        # Attributes are read directly (not through Request's properties): this runs per running request.
        while i < len(running) and budget > 0:
            req = running[i]
            if skip_in_flight and req.num_in_flight:
                i += 1
                continue
            pending = req.num_pending_tokens
            known = len(req.all_token_ids)
            if pending and (known + pending >= max_len or (
                    req.max_tokens is not None and known - req.num_prompt_tokens + pending >= req.max_tokens)):
                i += 1      # its pending token is its last: it finishes when that token arrives
                continue
            n = min(known + pending - req.num_computed_tokens, budget)
            while not kv_cache.allocate(req, n):
                victim = running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            else:
                chosen.append((req, n))
                budget -= n
                i += 1

        # Admit new work only when nothing had to be preempted this step. A request whose LoRA adapter
        # would need a device slot when every slot holds another running adapter waits its turn.
        max_loras = self.config.max_loras
        loras = {r.lora_int_id for r in self.running if r.lora_int_id} if max_loras else set()
        skipped: list[Request] = []
        while self.waiting and budget > 0 and not out.num_preempted \
                and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self.skip_in_flight and req.num_in_flight:
                break   # preempted while its last micro-batch is still running
            if req.lora_int_id and req.lora_int_id not in loras and len(loras) >= max_loras:
                skipped.append(self.waiting.popleft())
                continue
            # Prompt log-probabilities need every prompt position computed: no prefix-cache skip.
            cached = [] if req.wants_prompt_logprobs else self.kv_cache.find_cached_prefix(req)
            num_cached = len(cached) * self.kv_cache.block_size
            req.num_computed_tokens = num_cached
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate(req, n, cached):
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen.append((req, n))
            budget -= n
            if req.lora_int_id:
                loras.add(req.lora_int_id)
        self.waiting.extendleft(reversed(skipped))

        # Batch order: single-token chunks (decodes) first, as the attention backends expect (a stable
        # partition, as a sort on n != 1 would give).
        ones = [rn for rn in chosen if rn[1] == 1]
        if len(ones) != len(chosen):
            chosen = ones + [rn for rn in chosen if rn[1] != 1]
        out.requests = [r for r, _ in chosen]
        out.num_tokens = [n for _, n in chosen]
        return out

    def update_after_step(self, out: SchedulerOutput) -> int:
        """Advance each scheduled request by the tokens just computed; a chunk that reached the
        end of the known tokens sampled one, pending until the engine appends it. Returns how many
        of the step's tokens were prompt tokens."""
        prompt = 0
        for req, n in zip(out.requests, out.num_tokens):
            c = req.num_computed_tokens
            if c < req.num_prompt_tokens:
                prompt += min(n, req.num_prompt_tokens - c)
            c += n
            req.num_computed_tokens = c
            if c == len(req.all_token_ids) + req.num_pending_tokens:
                req.num_pending_tokens += 1
        return prompt

