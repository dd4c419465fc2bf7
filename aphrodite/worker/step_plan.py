"""What the engine tells the workers each step: a flat, picklable description, never engine objects.

A request's fixed data (prompt ids, sampling parameters, seed, EOS ids) travels once, in the
first step that schedules it (``NewRequestData``). Every step then carries, per scheduled
request in batch order, only numbers and deltas: tokens scheduled, tokens already computed,
samples still pending on the device, the block-table change and the tokens the host learned
since it last sent that request. Each worker folds these into its own ``RequestState``
records, so one process or N processes (tensor/pipeline ranks, Ray actors) run the same code
from the same message, which the executor broadcasts once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aphrodite.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request's fixed data, sent in the first step that schedules it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sample_seed: int
    eos_token_ids: tuple[int, ...]
    lora_int_id: int = 0


@dataclass
class StepPlan:
    """One step. The per-request lists are parallel, in batch order (one-token chunks first).

    ``num_kept_blocks[i]``: how many of its blocks the worker keeps before appending its
    ``num_new_blocks[i]`` next ids from ``new_block_ids`` (0 kept after a preemption freed the old
    table). Its ``num_new_tokens[i]`` next ids from ``new_token_ids`` are the tokens the host
    appended to the request since it last sent it (outputs the host learned, including those a
    worker sampled). ``num_pending[i]``: sampled tokens the host does not know yet (async
    scheduling), so the worker reads them from its device copy. Block and token deltas are flat
    lists (with per-request counts) because a list of small lists costs about twice as much to
    pickle and unpickle.
    """

    step_id: int = 0
    new_requests: list[NewRequestData] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    num_scheduled: list[int] = field(default_factory=list)
    num_computed: list[int] = field(default_factory=list)
    num_pending: list[int] = field(default_factory=list)
    num_kept_blocks: list[int] = field(default_factory=list)
    num_new_blocks: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)   # finished, aborted: drop their records
    # Structured output: [len(req_ids), ceil(vocab/32)] int32 token bitmask from the engine's grammar
    # matchers (bit set = allowed; unconstrained rows all ones), or None when no row is constrained.
    grammar_bitmask: np.ndarray | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled)

    def __len__(self) -> int:
        return len(self.req_ids)


class RequestState:
    """A worker's record of one request, built from the plans it received.

    Attribute names match the engine's ``Request`` where the sampler reads them
    (``request_id, params, prompt_token_ids, output_token_ids, sample_seed,
    num_outputs_with_pending, eos_token_ids``).
    """

    __slots__ = ("request_id", "params", "prompt_token_ids", "all_token_ids", "num_prompt_tokens", "sample_seed",
                 "eos_token_ids", "lora_int_id", "num_computed_tokens", "num_pending_tokens", "block_ids",
                 "num_prompt_logprobs")

    def __init__(self, data: NewRequestData) -> None:
        self.request_id = data.request_id
        self.params = data.params
        self.prompt_token_ids = data.prompt_token_ids
        self.all_token_ids: list[int] = list(data.prompt_token_ids)
        self.num_prompt_tokens = len(data.prompt_token_ids)
        self.sample_seed = data.sample_seed
        self.eos_token_ids = data.eos_token_ids
        self.lora_int_id = data.lora_int_id
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.block_ids: list[int] = []
        # Prompt positions whose log-probabilities were produced (position 0 has none).
        self.num_prompt_logprobs = 1

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def num_outputs_with_pending(self) -> int:
        """Output tokens including those still on the device: the next sample's position."""
        return len(self.all_token_ids) - self.num_prompt_tokens + self.num_pending_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens


def apply_plan(states: dict[str, RequestState], plan: StepPlan) -> list[RequestState]:
    """Fold ``plan`` into a worker's records; returns the scheduled requests' records in batch order."""
    for rid in plan.finished_ids:
        states.pop(rid, None)
    for data in plan.new_requests:
        states[data.request_id] = RequestState(data)
    scheduled = []
    tok = blk = 0
    for i, rid in enumerate(plan.req_ids):
        s = states[rid]
        n = plan.num_new_tokens[i]
        if n:
            s.all_token_ids.extend(plan.new_token_ids[tok:tok + n])
            tok += n
        s.num_computed_tokens = plan.num_computed[i]
        s.num_pending_tokens = plan.num_pending[i]
        kept = plan.num_kept_blocks[i]
        if kept != len(s.block_ids):
            del s.block_ids[kept:]
        n = plan.num_new_blocks[i]
        if n:
            s.block_ids.extend(plan.new_block_ids[blk:blk + n])
            blk += n
        scheduled.append(s)
    return scheduled
