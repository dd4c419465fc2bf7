"""Per-step sampling inputs: the scheduled requests' parameters as batch tensors.

On the GPU every tensor goes up from pinned memory with a non-blocking copy: a plain
``torch.tensor(..., device="cuda")`` waits for the stream to drain, which would stall the host
on the step still running (async scheduling).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from aphrodite.modeling.layers.sampler import SamplingMetadata, uniform_from_seed
from aphrodite.worker.step_plan import RequestState

if TYPE_CHECKING:
    from aphrodite.worker.model_runner import PrevTokens


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list or numpy array) as a tensor on ``device``, without waiting on the GPU."""
    t = torch.from_numpy(values).to(dtype) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def build_sampling_metadata(requests: list[RequestState], vocab_size: int, device: torch.device,
                            pending: tuple[np.ndarray, PrevTokens] | None = None) -> SamplingMetadata:
    """Gather the scheduled requests' parameters into one batch of tensors.

    ``pending``: (rows, where on the device) of rows whose newest output token the host does
    not know yet (async scheduling); the penalties read it from the device.
    """
    ps = [r.params for r in requests]
    temp = [0.0 if p.is_greedy else p.temperature for p in ps]
    all_greedy = not any(temp)

    def column(values: list, neutral, dtype) -> torch.Tensor | None:
        if all(v == neutral for v in values):
            return None
        return to_device(values, dtype, device)

    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in ps]
    presence = column([p.presence_penalty for p in ps], 0.0, torch.float32)
    frequency = column([p.frequency_penalty for p in ps], 0.0, torch.float32)
    repetition = column([p.repetition_penalty for p in ps], 1.0, torch.float32)
    output_tokens = prompt_tokens = None
    if presence is not None or frequency is not None or repetition is not None:
        output_tokens = _pad([r.output_token_ids for r in requests], vocab_size, device)
        if pending is not None:
            output_tokens = _with_pending(output_tokens, pending, vocab_size)
        if repetition is not None:
            prompt_tokens = _pad([r.prompt_token_ids for r in requests], vocab_size, device)

    ban_rows: list[int] = []
    ban_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    for i, (r, p) in enumerate(zip(requests, ps)):
        if r.num_outputs_with_pending < p.min_tokens:
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(r.eos_token_ids)
            ban_ids.extend(stops)
            ban_rows.extend([i] * len(stops))
        if p.logit_bias:
            for tok, val in p.logit_bias.items():
                if 0 <= int(tok) < vocab_size:
                    bias_rows.append(i)
                    bias_ids.append(int(tok))
                    bias_vals.append(float(val))
    banned = None
    if ban_rows:
        banned = (to_device(ban_rows, torch.long, device), to_device(ban_ids, torch.long, device))
    bias = None
    if bias_rows:
        bias = (to_device(bias_rows, torch.long, device), to_device(bias_ids, torch.long, device),
                to_device(bias_vals, torch.float32, device))
    want = [p.logprobs for p in ps if p.logprobs is not None]
    need_cum = any(p.best_of > p.n for p in ps)
    max_logprobs = max(want) if want else (0 if need_cum else -1)
    return SamplingMetadata(
        # A greedy batch needs neither temperatures nor random draws: skip their host-to-device copies.
        temperature=None if all_greedy else to_device(temp, torch.float32, device),
        all_greedy=all_greedy, all_random=all(temp),
        top_p=column([p.top_p for p in ps], 1.0, torch.float32),
        top_k=column(top_k, vocab_size, torch.long),
        top_k_max=max(top_k) if any(k != vocab_size for k in top_k) else 0,
        min_p=column([p.min_p for p in ps], 0.0, torch.float32),
        uniforms=None if all_greedy else to_device(
            [uniform_from_seed(r.sample_seed, r.num_outputs_with_pending) for r in requests], torch.float64, device),
        presence=presence, frequency=frequency, repetition=repetition,
        output_tokens=output_tokens, prompt_tokens=prompt_tokens, banned=banned, bias=bias,
        max_logprobs=max_logprobs)


def _with_pending(tokens: torch.Tensor, pending: tuple[np.ndarray, PrevTokens], pad: int) -> torch.Tensor:
    """Append one column: each row's token still on the device, or the pad id."""
    rows, prev = pending
    col = torch.full((tokens.shape[0],), pad, dtype=tokens.dtype, device=tokens.device)
    dev = prev.tokens.device
    col[to_device(rows, torch.long, dev)] = prev.tokens[to_device(prev.src, torch.long, dev)].to(tokens.dtype)
    return torch.cat([tokens, col[:, None]], dim=1)


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    arr = np.full((len(rows), max(width, 1)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return to_device(arr, torch.long, device)
