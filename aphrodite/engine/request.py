"""One sequence the engine is generating, and the bookkeeping the scheduler needs for it."""
from __future__ import annotations

import enum
import time

from aphrodite.lora.request import LoRARequest
from aphrodite.outputs import Logprob
from aphrodite.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


# The finished statuses, for hot loops: a tuple test avoids the enum property's call.
FINISHED_STATUSES = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """A single sequence: prompt tokens, generated tokens, KV blocks, and progress.

    A user request with ``n > 1`` becomes ``n`` of these sharing the prompt (and, through the
    prefix cache, its KV blocks).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 sample_seed: int, eos_token_ids: tuple[int, ...], arrival_time: float | None = None,
                 parent_id: str | None = None, lora_request: LoRARequest | None = None) -> None:
        self.request_id = request_id
        self.lora_request = lora_request
        self.lora_int_id = lora_request.lora_int_id if lora_request is not None else 0
        self.parent_id = parent_id if parent_id is not None else request_id
        self.prompt_token_ids = prompt_token_ids
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.sample_seed = sample_seed
        self.eos_token_ids = eos_token_ids
        self.max_tokens = params.max_tokens
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_token_time: float | None = None
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        # Tokens sampled on the device but not yet appended (async scheduling: the host learns a
        # step's tokens after queuing the next step); the scheduler counts them as if known.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0          # prompt tokens served from the prefix cache at admission
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []   # chained hashes of this request's full blocks
        self.num_named_blocks = 0           # leading blocks already registered in the prefix cache
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.detokenizer = None             # set by the engine when text is wanted
        self.grammar = None                 # structured output: the request's GrammarState, once compiled
        self.output_text = ""
        # What the workers already hold (see ``worker.step_plan``): the request's fixed data, its first
        # num_sent_tokens tokens and its first num_sent_blocks blocks (reset when a preemption frees them).
        self.sent_to_workers = False
        self.num_sent_tokens = 0
        self.num_sent_blocks = 0
        self.num_in_flight = 0              # queued steps that include it, not yet absorbed

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def num_outputs_with_pending(self) -> int:
        """Output tokens including those still on the device: the next sample's position."""
        return len(self.all_token_ids) - self.num_prompt_tokens + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while prompt positions remain whose log-probabilities are still owed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self.num_pending_tokens = max(0, self.num_pending_tokens - 1)
