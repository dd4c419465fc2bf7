"""What one step's sampler reads: per-row parameters as tensors, plus per-request state rows.

Every per-row tensor has the batch's rows as its first dimension, so a subset of rows (a group
with its own sampler order) is taken with one ``index_select`` per tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from aphrodite.sampling_params import SamplerID

_MASK64 = (1 << 64) - 1


def uniform_from_seed(seed: int, counter: int) -> float:
    """A uniform number in [0, 1) from splitmix64(seed, counter): cheap, stateless, reproducible."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (1.0 / (1 << 53))


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    """Host ints as a long tensor on ``device``; via pinned memory on the GPU (a pageable copy would wait)."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class PenaltyRows:
    """Penalty inputs for the rows that use them, over their histories: only the (row, token) pairs that
    occur in a row's prompt or output can be penalized, so the sampler touches those and never whole rows."""

    rows: torch.Tensor           # [R] batch rows
    host_rows: list[int]
    history: torch.Tensor        # [R, W] prompt + output ids; padding repeats the row's last token
    counts: torch.Tensor         # [R, W] int32: output count of each position's token
    presence: torch.Tensor       # [R] float
    frequency: torch.Tensor      # [R] float
    repetition: torch.Tensor     # [R] float


@dataclass
class DryRows:
    """DRY inputs for the rows that use it (``rows`` index the batch)."""

    rows: torch.Tensor           # [R] batch rows
    host_rows: list[int]         # the same rows, known on the host (a subset is taken without a GPU wait)
    history: torch.Tensor        # [R, W] prompt + output ids (W = longest history), padded
    suffix: torch.Tensor         # [R, W] per position: common breaker-free suffix with the last token
    trailing: torch.Tensor       # [R] breaker-free tokens ending the history
    multiplier: torch.Tensor     # [R] float
    base: torch.Tensor           # [R] float
    # [R, 6] long, worked out on the host: window start, index of the newest token (length - 1), the
    # match cap before the breaker distance (min(max_ngram, window - 1); -1: the row cannot match),
    # allowed_length, how many recent occurrences count, the early-exit match length.
    bounds: torch.Tensor


@dataclass
class NgramRows:
    """no_repeat_ngram inputs for the rows that use it."""

    rows: torch.Tensor           # [R]
    host_rows: list[int]
    history: torch.Tensor        # [R, W]
    lengths: torch.Tensor        # [R]
    suffix: torch.Tensor         # [R, W] common suffix (with the last token) length per position
    need: torch.Tensor           # [R, 1] long: n - 1, or more than W when the row cannot match (length < n)


@dataclass
class BadWordRows:
    """Multi-token bad words whose prefix may match the end of a row's output."""

    rows: torch.Tensor           # [M] batch rows
    last: torch.Tensor           # [M] the token to ban when the prefix matches
    slots: torch.Tensor          # [M] state slots of the histories
    positions: torch.Tensor      # [M, P] history positions of the prefix (padded with 0)
    prefix: torch.Tensor         # [M, P] the prefix ids (padding: -1, always "matches")


@dataclass
class MirostatRows:
    rows: torch.Tensor           # [R]
    tau: torch.Tensor
    eta: torch.Tensor
    mu: torch.Tensor             # [R] current mu (gathered from the state)
    store: torch.Tensor          # the state's mu buffer
    slots: torch.Tensor          # [R] where each row's mu lives in ``store``


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters as tensors (row i samples for request i of the step)."""

    num_rows: int
    temperature: torch.Tensor | None  # [N] float, 0 -> greedy; None when all rows are greedy
    all_greedy: bool
    all_random: bool                 # no greedy row: the greedy argmax can be skipped
    uniforms: torch.Tensor | None    # [N] float64 draws for the inverse CDF; None when all greedy
    # Samplers of the ordered chain that some row uses, and each one's per-row columns.
    active: frozenset[SamplerID] = frozenset()
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    top_k_max: int = 0               # the largest top_k, known on the host (0 when no row uses it)
    # Rows grouped by sampler order: [(order, rows on the device, the same rows on the host)]; one group
    # with (order, None, None) when every row shares the order.
    groups: list[tuple[tuple[SamplerID, ...], torch.Tensor | None, list[int] | None]] = field(default_factory=list)
    # Logit processors applied before the chain.
    banned: tuple[torch.Tensor, torch.Tensor] | None = None   # (rows, token ids) set to -inf
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, ids, values)
    allowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows using it, rows, ids)
    bad_words: BadWordRows | None = None
    bad_words_history: torch.Tensor | None = None   # the state's history buffer the bad-word slots index
    grammar_bitmask: torch.Tensor | None = None     # [N, ceil(V/32)] int32, bit set = allowed
    # Repetition state, gathered from the per-request state.
    penalties: PenaltyRows | None = None
    dry: DryRows | None = None
    ngram: NgramRows | None = None
    mirostat: MirostatRows | None = None
    skew: torch.Tensor | None = None         # [N] skew; None when no random row uses it
    xtc_uniforms: torch.Tensor | None = None  # [N] float: XTC fires when below xtc_probability
    max_logprobs: int = -1                    # largest top-N any row asked for; -1 if none needs logprobs
    # Per row, known on the host: its top_k when on, 0 for a greedy row (it only needs the argmax), -1 for a
    # row that needs every token (sampled without top_k, or mirostat). When no row is -1, the chain keeps
    # only the top-k candidates after top-k and every later sampler runs on those few columns.
    k_host: list[int] = field(default_factory=list)

    def subset(self, rows: torch.Tensor, host_rows: list[int]) -> SamplingMetadata:
        """The same metadata restricted to ``rows`` (a group with its own sampler order)."""
        n = self.num_rows

        def take(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n:
                return v.index_select(0, rows)
            if isinstance(v, dict):
                return {k: take(t) for k, t in v.items()}
            return v

        out = {f.name: take(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("penalties", "dry", "ngram", "mirostat", "bad_words", "banned", "bias", "allowed",
                                 "groups")}
        out["num_rows"] = len(host_rows)
        # Row-indexed pieces (penalties, DRY, n-grams) keep their rows in the group, renumbered (on the host).
        where = {r: i for i, r in enumerate(host_rows)}
        out["k_host"] = [self.k_host[r] for r in host_rows] if self.k_host else []
        for name in ("penalties", "dry", "ngram"):
            part = getattr(self, name)
            out[name] = None
            keep = [k for k, r in enumerate(part.host_rows) if r in where] if part is not None else []
            if not keep:
                continue
            idx = _ids(keep, rows.device)
            vals = {f.name: getattr(part, f.name).index_select(0, idx) for f in dataclasses.fields(part)
                    if f.name != "host_rows"}
            new_rows = [where[part.host_rows[k]] for k in keep]
            vals["rows"] = _ids(new_rows, rows.device)
            out[name] = type(part)(host_rows=new_rows, **vals)
        return SamplingMetadata(**out, mirostat=None, bad_words=None, banned=None, bias=None, allowed=None)
