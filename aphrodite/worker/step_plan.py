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
    # Async scheduling: the bitmask is not known yet (the step in flight samples the tokens it depends on).
    # The worker queues the forward pass now, and its sampler waits for the step's ``GrammarBitmask``.
    grammar_pending: bool = False

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled)

    def __len__(self) -> int:
        return len(self.req_ids)


@dataclass
class GrammarBitmask:
    """The token bitmask of a step sent with ``grammar_pending``, in the same layout as
    ``StepPlan.grammar_bitmask`` (None: no row is constrained any more, e.g. they all finished).
    Sent once the engine has advanced its grammars with the previous step's tokens, while the
    device runs this step's forward pass; every rank that samples applies it."""

    step_id: int
    bitmask: np.ndarray | None = None


class RequestState:
    """A worker's record of one request, built from the plans it received.

    Attribute names match the engine's ``Request`` where the sampler reads them
    (``request_id, params, prompt_token_ids, output_token_ids, sample_seed,
    num_outputs_with_pending, eos_token_ids``).
    """

    __slots__ = ("request_id", "params", "prompt_token_ids", "all_token_ids", "num_prompt_tokens", "sample_seed",
                 "eos_token_ids", "lora_int_id", "num_computed_tokens", "num_pending_tokens", "num_blocks", "row",
                 "num_prompt_logprobs")

    def __init__(self, data: NewRequestData, row: int = -1) -> None:
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
        # Its block table is row ``row`` of the worker's ``BlockTables`` (first ``num_blocks`` entries).
        self.num_blocks = 0
        self.row = row
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


class BlockTables:
    """Every live request's block table as one row of a persistent int32 array, zero past its blocks.

    A plan only carries block-table deltas, so the rows are updated where they change and a step's
    tables are one fancy-indexed gather (``gather``) instead of a list-to-array copy per request.
    Rows and columns grow by doubling; a freed row is zeroed and reused."""

    def __init__(self, rows: int = 64, cols: int = 16) -> None:
        self.table = np.zeros((rows, cols), dtype=np.int32)
        self._free: list[int] = []
        self._next = 0

    def add(self) -> int:
        if self._free:
            return self._free.pop()
        row = self._next
        self._next += 1
        if row >= self.table.shape[0]:
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        return row

    def free(self, row: int, num_blocks: int) -> None:
        self.table[row, :num_blocks] = 0
        self._free.append(row)

    def truncate(self, row: int, keep: int, num_blocks: int) -> None:
        self.table[row, keep:num_blocks] = 0

    def write(self, rows: list[int], starts: list[int], counts: list[int], block_ids: list[int]) -> None:
        """Write ``counts[i]`` ids from ``block_ids`` (in order) into row ``rows[i]`` from column ``starts[i]``,
        for all rows with one scatter."""
        counts_np = np.array(counts, dtype=np.int64)
        first = np.cumsum(counts_np) - counts_np        # each row's first id in ``block_ids``
        rr = np.repeat(np.array(rows, dtype=np.int64), counts_np)
        cc = np.repeat(np.array(starts, dtype=np.int64) - first, counts_np) + np.arange(len(block_ids))
        end = int(cc.max()) + 1
        if end > self.table.shape[1]:
            cols = self.table.shape[1]
            while cols < end:
                cols *= 2
            grown = np.zeros((self.table.shape[0], cols), dtype=np.int32)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        self.table[rr, cc] = block_ids

    def gather(self, rows: np.ndarray, width: int) -> np.ndarray:
        """``[len(rows), width]`` tables of these rows (a copy)."""
        return self.table[rows, :width]


def apply_plan(states: dict[str, RequestState], plan: StepPlan, tables: BlockTables) -> list[RequestState]:
    """Fold ``plan`` into a worker's records and block tables; returns the scheduled requests' records in
    batch order."""
    for rid in plan.finished_ids:
        s = states.pop(rid, None)
        if s is not None:
            tables.free(s.row, s.num_blocks)
    for data in plan.new_requests:
        old = states.get(data.request_id)
        if old is not None:
            tables.free(old.row, old.num_blocks)
        states[data.request_id] = RequestState(data, tables.add())
    scheduled = [states[rid] for rid in plan.req_ids]
    new_tokens, new_blocks, kept_blocks = plan.num_new_tokens, plan.num_new_blocks, plan.num_kept_blocks
    if any(new_tokens):
        tok = 0
        token_ids = plan.new_token_ids
        for s, n in zip(scheduled, new_tokens):
            if n:
                s.all_token_ids.extend(token_ids[tok:tok + n])
                tok += n
    rows, starts, counts = [], [], []     # the table rows that grow: written with one scatter below
    for s, c, p, kept, n in zip(scheduled, plan.num_computed, plan.num_pending, kept_blocks, new_blocks):
        s.num_computed_tokens = c
        s.num_pending_tokens = p
        if kept != s.num_blocks:     # fewer: a preemption freed the table (kept 0)
            tables.truncate(s.row, kept, s.num_blocks)
            s.num_blocks = kept
        if n:
            rows.append(s.row)
            starts.append(kept)
            counts.append(n)
            s.num_blocks = kept + n
    if rows:
        tables.write(rows, starts, counts, plan.new_block_ids)
    return scheduled
