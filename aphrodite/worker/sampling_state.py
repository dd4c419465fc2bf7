"""Per-request sampling state that lives on the device between steps.

Penalties need each request's history and output-token counts, DRY and no_repeat_ngram its history and, per
history position, how long a run ending there matches the history's end; mirostat needs
its running ``mu``. Rebuilding these from Python lists every step would cost O(history) host
work per request per step, so they are kept here, keyed by request id:

- ``add(req)`` when a request first samples (or comes back after preemption): built once from
  its prompt and output ids;
- ``update(ids, sampled)`` after every step, with the sampled ids still on the device (async
  scheduling: the host learns them a step later), so nothing waits on the GPU;
- ``remove(id, finished)`` when a request finishes or is preempted; mirostat's ``mu`` cannot be
  rebuilt from tokens, so it survives preemption and is dropped only when the request finishes.

Only requests that use a repetition sampler or mirostat get a slot. Slot 0 stays all-zero so
rows without state gather zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from aphrodite.kernels import sampling as ks
from aphrodite.kernels.triton_utils import use_triton

if TYPE_CHECKING:
    from aphrodite.sampling_params import SamplingParams
    from aphrodite.worker.sampling_inputs import SamplingRequest


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list or numpy array) as a tensor on ``device``, without waiting on the GPU."""
    t = torch.from_numpy(values).to(dtype) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def suffix_matches(tokens: np.ndarray, breakers: frozenset[int] | None, cap: int) -> np.ndarray:
    """Per position j < len - 1: how many tokens ending at j equal the tokens ending at the history's
    end (capped at ``cap``; with ``breakers``, runs stop at a breaker token). Host-side, once per add."""
    n = len(tokens)
    out = np.zeros(n, dtype=np.int32)
    if n < 2:
        return out
    ok = np.ones(n - 1, dtype=bool)
    if breakers:
        brk = np.isin(tokens, np.fromiter(breakers, dtype=np.int64))
    for k in range(min(cap, n - 1)):
        j = np.arange(n - 1) - k
        valid = j >= 0
        cond = valid & (tokens[np.clip(j, 0, None)] == tokens[n - 1 - k])
        if breakers:
            cond &= ~brk[np.clip(j, 0, None)]
        ok &= cond
        if not ok.any():
            break
        out[:n - 1] += ok
    return out


@dataclass
class _Record:
    slot: int
    length: int              # tokens in the history so far (prompt + outputs)
    counts: bool             # presence / frequency / repetition penalty
    history: bool            # penalties, DRY, no_repeat_ngram, multi-token bad words
    dry: bool
    ngram: bool


class SamplingState:
    """Device buffers of the repetition samplers and mirostat, one slot per request that needs them."""

    def __init__(self, vocab_size: int, max_model_len: int, device: torch.device, capacity: int = 8) -> None:
        self.vocab_size = vocab_size
        self.max_len = max_model_len + 1
        self.device = device
        self._records: dict[str, _Record] = {}
        self._free: list[int] = []
        self._next_slot = 1              # slot 0: all zeros for rows without state
        self._capacity = capacity
        self.counts: torch.Tensor | None = None      # [S, V] int32 output-token counts
        self.history: torch.Tensor | None = None     # [S, max_len] int64
        self.dry_suffix: torch.Tensor | None = None  # [S, max_len] int32
        self.dry_trailing: torch.Tensor | None = None  # [S] int64: breaker-free tokens at the end
        self.dry_breakers: torch.Tensor | None = None  # [S, B] int64, padded with -1
        self.dry_cap: torch.Tensor | None = None     # [S] int32: suffix values saturate here
        self.ngram_suffix: torch.Tensor | None = None  # [S, max_len] int32
        self._mu: dict[str, int] = {}                # request id -> slot in ``mu``
        self._mu_free: list[int] = []
        self.mu = torch.zeros(capacity, dtype=torch.float32, device=device)

    # ---- bookkeeping -----------------------------------------------------------------
    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def record(self, request_id: str) -> _Record | None:
        return self._records.get(request_id)

    def length(self, request_id: str) -> int:
        return self._records[request_id].length

    @staticmethod
    def needs(req: SamplingRequest) -> tuple[bool, bool, bool, bool, bool]:
        """(counts, history, dry, ngram, mirostat) that ``req``'s parameters use."""
        return SamplingState.params_need(req.params)

    @staticmethod
    def params_need(p: SamplingParams) -> tuple[bool, bool, bool, bool, bool]:
        """(counts, history, dry, ngram, mirostat) that requests with these parameters use."""
        counts = p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1.0
        dry = p.dry_multiplier > 0
        ngram = p.no_repeat_ngram_size > 0
        words = any(len(s) > 1 for s in (p._bad_words_token_ids or ()))
        miro = p.mirostat_mode == 2
        if miro:
            counts = dry = ngram = False      # Aphrodite: mirostat rows skip the other samplers
        return counts, counts or dry or ngram or words, dry, ngram, miro

    def _grow(self, name: str, tail: tuple[int, ...], dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
        """Buffer ``name`` with a row for every slot up to the capacity (grown by doubling)."""
        buf = getattr(self, name)
        if buf is None or buf.shape[0] < self._capacity:
            new = torch.full((self._capacity, *tail), fill, dtype=dtype, device=self.device)
            if buf is not None:
                new[:buf.shape[0]] = buf
            setattr(self, name, new)
            buf = new
        return buf

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next_slot
        self._next_slot += 1
        while self._next_slot > self._capacity:
            self._capacity *= 2
        return slot

    # ---- the API the worker calls ------------------------------------------------------
    def add(self, req: SamplingRequest) -> None:
        """Start tracking ``req`` from its known tokens (new, or back after preemption)."""
        rid = req.request_id
        if rid in self._records:
            self.remove(rid, finished=False)
        counts, history, dry, ngram, miro = self.needs(req)
        p = req.params
        if miro and rid not in self._mu:
            slot = self._mu_free.pop() if self._mu_free else len(self._mu)
            if slot >= self.mu.shape[0]:
                self.mu = torch.cat([self.mu, torch.zeros_like(self.mu)])
            self._mu[rid] = slot
            self.mu[slot] = 2.0 * p.mirostat_tau     # Aphrodite starts mu at twice the target surprise
        if not (counts or history):
            return
        prompt, out = list(req.prompt_token_ids), list(req.output_token_ids)
        tokens = np.asarray(prompt + out, dtype=np.int64)
        slot = self._new_slot()
        rec = _Record(slot, len(tokens), counts, history, dry, ngram)
        self._records[rid] = rec
        V = self.vocab_size
        if counts:
            c = self._grow("counts", (V,), torch.int32)
            row = np.zeros(V, dtype=np.int32)
            np.add.at(row, np.asarray(out, dtype=np.int64), 1)
            c[slot].copy_(to_device(row, torch.int32, self.device))
        if history:
            if len(tokens) > self.max_len:
                raise ValueError(f"History of {len(tokens)} tokens exceeds max_model_len.")
            h = self._grow("history", (self.max_len,), torch.int64)
            row = np.zeros(self.max_len, dtype=np.int64)
            row[:len(tokens)] = tokens
            h[slot].copy_(to_device(row, torch.int64, self.device))
        if dry:
            breakers = frozenset(p.dry_sequence_breaker_ids)
            cap = p.dry_max_ngram + 2
            suf = np.zeros(self.max_len, dtype=np.int32)
            suf[:len(tokens)] = suffix_matches(tokens, breakers, cap)
            trailing = 0
            for t in tokens[::-1]:
                if int(t) in breakers:
                    break
                trailing += 1
            width = max(1, len(breakers))
            have = 1 if self.dry_breakers is None else self.dry_breakers.shape[1]
            bk = self._grow("dry_breakers", (have,), torch.int64, fill=-1)
            if have < width:
                bk = torch.cat([bk, bk.new_full((bk.shape[0], width - have), -1)], dim=1)
                self.dry_breakers = bk
            brow = np.full(bk.shape[1], -1, dtype=np.int64)
            brow[:len(breakers)] = sorted(breakers)
            bk[slot].copy_(to_device(brow, torch.int64, self.device))
            self._grow("dry_suffix", (self.max_len,), torch.int32)[slot].copy_(
                to_device(suf, torch.int32, self.device))
            self._grow("dry_trailing", (), torch.int64)[slot] = trailing
            self._grow("dry_cap", (), torch.int32)[slot] = cap
        if ngram:
            suf = np.zeros(self.max_len, dtype=np.int32)
            suf[:len(tokens)] = suffix_matches(tokens, None, p.no_repeat_ngram_size + 1)
            self._grow("ngram_suffix", (self.max_len,), torch.int32)[slot].copy_(
                to_device(suf, torch.int32, self.device))

    def remove(self, request_id: str, finished: bool = True) -> None:
        """Stop tracking a request; a preempted one (``finished=False``) keeps its mirostat mu."""
        rec = self._records.pop(request_id, None)
        if rec is not None:
            self._free.append(rec.slot)
            if rec.counts:
                self.counts[rec.slot].zero_()
        if finished and request_id in self._mu:
            self._mu_free.append(self._mu.pop(request_id))

    def mu_slot(self, request_id: str) -> int | None:
        return self._mu.get(request_id)

    def update(self, request_ids: list[str], sampled: torch.Tensor) -> None:
        """Append each row's sampled token (``sampled[i]`` for ``request_ids[i]``, on the device)."""
        if not self._records:
            return
        hits = [(i, rec) for i, rid in enumerate(request_ids) if (rec := self._records.get(rid)) is not None]
        if not hits:
            return
        dev = self.device
        here = torch.device(dev)
        if use_triton(sampled) and self.history is not None and sampled.device.type == here.type \
                and here.index in (None, sampled.device.index):
            # The GPU: one kernel for every row and buffer (the PyTorch ops below are a few dozen launches).
            flags = [(i, rec.slot, rec.length, ks.STATE_COUNTS * rec.counts + ks.STATE_HISTORY * rec.history
                      + ks.STATE_DRY * rec.dry + ks.STATE_NGRAM * rec.ngram) for i, rec in hits]
            ks.update_sampling_state(to_device(flags, torch.long, dev), sampled.long(), self.counts, self.history,
                                     self.dry_suffix, self.ngram_suffix, self.dry_trailing, self.dry_breakers,
                                     self.dry_cap)
            for _, rec in hits:
                rec.length += 1
            return
        rows = to_device([i for i, _ in hits], torch.long, dev)
        toks = sampled.index_select(0, rows.to(sampled.device)).to(dev).long()
        slots_l = [rec.slot for _, rec in hits]

        def part(flag: str) -> tuple[torch.Tensor, torch.Tensor, list[_Record]] | None:
            sel = [k for k, (_, rec) in enumerate(hits) if getattr(rec, flag)]
            if not sel:
                return None
            idx = to_device(sel, torch.long, dev)
            return (to_device([slots_l[k] for k in sel], torch.long, dev), toks.index_select(0, idx),
                    [hits[k][1] for k in sel])

        if (c := part("counts")) is not None:
            slots, t, _ = c
            self.counts.index_put_((slots, t), torch.ones_like(t, dtype=torch.int32), accumulate=True)
        if (h := part("history")) is not None:
            slots, t, recs = h
            pos = to_device([r.length for r in recs], torch.long, dev)
            self.history.index_put_((slots, pos), t)
            width = max(r.length for r in recs) + 1
            new_len = pos + 1
            for flag, buf_name in (("dry", "dry_suffix"), ("ngram", "ngram_suffix")):
                sel = [k for k, r in enumerate(recs) if getattr(r, flag)]
                if not sel:
                    continue
                k = to_device(sel, torch.long, dev) if len(sel) != len(recs) else None
                s_slots = slots if k is None else slots.index_select(0, k)
                s_tok = t if k is None else t.index_select(0, k)
                s_len = new_len if k is None else new_len.index_select(0, k)
                buf = getattr(self, buf_name)[:, :width]
                hist = self.history[:, :width].index_select(0, s_slots)
                old = buf.index_select(0, s_slots)
                shifted = torch.cat([torch.zeros_like(old[:, :1]), old[:, :-1]], dim=1) + 1
                match = hist == s_tok[:, None]
                p_idx = torch.arange(width, device=dev)[None, :]
                match &= p_idx < (s_len - 1)[:, None]
                if flag == "dry":
                    brk = (self.dry_breakers.index_select(0, s_slots) == s_tok[:, None]).any(dim=1)
                    match &= ~brk[:, None]
                    shifted = torch.minimum(shifted, self.dry_cap.index_select(0, s_slots)[:, None])
                    trailing = self.dry_trailing.index_select(0, s_slots)
                    self.dry_trailing.index_copy_(0, s_slots, torch.where(brk, torch.zeros_like(trailing),
                                                                          trailing + 1))
                buf.index_copy_(0, s_slots, torch.where(match, shifted, torch.zeros_like(shifted)))
        for _, rec in hits:
            rec.length += 1
