"""Model runner: turns a scheduled batch into tensors, runs the model, samples.

The batch is flat: the scheduled tokens of all requests are laid end to end with no
padding, and the attention metadata tells each layer where every sequence starts and
where its KV blocks are.

``queue`` only enqueues the work and returns a ``StepFuture``; the sampled ids stay on the
device as well, and a decode whose input token the host does not know yet (async
scheduling) reads it from there by index.
"""
from __future__ import annotations

import logging
import mmap
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from aphrodite.config import EngineConfig
from aphrodite.distributed.communication import pp_recv_tensors, pp_send_tensors, run_overlapped
from aphrodite.distributed.parallel_state import (
    get_pp_size,
    get_tp_cpu_group,
    get_tp_size,
    is_first_pp_rank,
    is_last_pp_rank,
)
from aphrodite.kernels.precompile import CompilePool, compile_ahead, pool_if_cold, warn_late_compiles
from aphrodite.kernels.sampling import sample_temperature_min_p
from aphrodite.lora.request import LoRARequest
from aphrodite.modeling.layers.attention import Attention, AttentionMetadata, set_attention_metadata
from aphrodite.modeling.layers.sampler import Sampler, gather_logprobs
from aphrodite.modeling.layers.samplers.metadata import SamplingMetadata
from aphrodite.modeling.loader import load_model
from aphrodite.modeling.models.pipeline import IntermediateTensors, intermediate_tensor_spec
from aphrodite.worker.cuda_graphs import DecodeGraphs
from aphrodite.worker.profiler import mark_startup
from aphrodite.worker.sampling_inputs import SamplingState, StaticRowsCache, build_sampling_metadata, to_device
from aphrodite.worker.step_future import ModelRunnerOutput, PositionLogprobs, StepFuture
from aphrodite.worker.step_inputs import BitmaskUpload, StepInputs, slice_metadata
from aphrodite.worker.step_plan import BlockTables, GrammarBitmask, RequestState, StepPlan, apply_plan

__all__ = ["HostBatch", "ModelRunner", "ModelRunnerOutput", "PositionLogprobs", "PrevTokens", "StepFuture"]

logger = logging.getLogger(__name__)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU a private anonymous mapping: page-aligned (malloc's 16-byte
    alignment split every cache row across cache lines and made the C decode attention ~1.6x
    slower) and lazily zeroed, so untouched pages cost no RAM or time."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def overlap_min_tokens() -> int:
    """``APHRODITE_TP_OVERLAP_MIN_TOKENS``: eager steps of at least this many tokens run as two overlapped
    halves (0, the default: never). Off until measured to win: at 16k-token prefill steps of the 8B shape at
    TP=2 the 64 NCCL all-reduces (134 MB each) took ~20% of the device's time, but the first A/B on 2 x H200
    (54.4k vs 59.2k total tok/s) had the overlapped run first, paying first-use compiles."""
    return max(0, int(os.environ.get("APHRODITE_TP_OVERLAP_MIN_TOKENS", "0")))


def mixed_step_layouts(num_kv_heads: int, max_seqs: int, max_len: int, sms: int, group: int = 4,
                       head_dim: int = 128) -> list[tuple[int, int, int, int]]:
    """``(decodes, decode context, prefill sequences, prefill chunk)`` layouts that together meet every
    attention-kernel specialization a mixed prefill + decode step can need, so that compiling ahead covers
    them (otherwise a throughput run compiles them, seconds each, inside its first mixed steps).

    Triton specializes an int argument as 1, a multiple of 16, or other: the decode count (``nd``) and the
    prefill sequence count each take all three; the decode launch compiles in the power of two above the
    split-KV factor (``choose_num_splits``: it splits while decodes x KV heads leave SMs idle and the context
    is >= 1024); the prefill launch compiles per (sequence-count class, tile), its tile height following its
    longest chunk times ``group`` (query heads per KV head) up to a cap that depends on ``head_dim``."""
    from aphrodite.kernels.paged_attention import _prefill_tiles, choose_num_splits
    from aphrodite.kernels.triton_utils import next_pow2

    def cls(n: int) -> int:
        return 1 if n == 1 else 16 if n % 16 == 0 else 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted: dict[tuple[int, int], tuple[int, int]] = {}
    lengths = [1023] + [1024 << i for i in range(max(0, max_len.bit_length() - 10)) if 1024 << i <= max_len]
    for nd in range(1, min(max_seqs, 2 * sms // max(1, num_kv_heads) + 17) + 1):
        for length in lengths:
            splits = choose_num_splits(nd, num_kv_heads, length, device) if sms else 1
            wanted.setdefault((cls(nd), next_pow2(splits)), (nd, length))
    # Chunks doubling from 2 tokens reach every tile height for any group size.
    tiles: dict[tuple[int, tuple], tuple[int, int]] = {}
    for nseq in (1, 16, 3):
        for chunk in (2, 4, 8, 16, 32, 64, 128):
            tiles.setdefault((cls(nseq), _prefill_tiles(group, next_pow2(head_dim), chunk)), (nseq, chunk))
    prefills = list(tiles.values())
    layouts = []
    for i, (nd, length) in enumerate(sorted(wanted.values())):
        nseq, chunk = prefills[i % len(prefills)]
        layouts.append((nd, length, nseq, chunk))
    for nseq, chunk in prefills[len(layouts):]:
        layouts.append((1, 1023, nseq, chunk))
    return [(nd, length, nseq, chunk) for nd, length, nseq, chunk in layouts
            if nd + nseq <= max_seqs and length <= max_len]


def _warm_draw_kernels(logits: torch.Tensor) -> None:
    """The fused temperature draw, with and without min-p, over one row of the profiling pass's logits, so
    that its kernels are compiled ahead with the rest, not by the first sampled request (the late-compile
    warning found them there). If this fails they compile at first use, as before."""
    if logits.device.type != "cuda":
        return
    row = logits[:1].float()
    ones = torch.ones(1, device=row.device)
    try:
        for min_p in (None, ones * 0.1):
            sample_temperature_min_p(row, ones, min_p, torch.full((1,), 0.5, dtype=torch.float64, device=row.device))
    except Exception:
        logger.warning("The temperature draw's kernels are not compiled ahead", exc_info=True)


@dataclass
class PrevTokens:
    """Input ids that are the previous step's sampled ids, still only on the device."""

    tokens: torch.Tensor        # the previous step's sampled ids, one per row that sampled
    dst: np.ndarray             # positions in this step's flat input ids
    src: np.ndarray             # rows of ``tokens`` that go there
    req_rows: np.ndarray        # the batch rows (requests) those positions belong to


@dataclass
class HostBatch:
    """One step's flat batch on the host; decodes (one token each) come first."""

    ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    starts: list[int]
    seq_lens: list[int]
    block_tables: np.ndarray
    num_decodes: int
    from_prev: PrevTokens | None = None
    samples: np.ndarray | None = None   # [num_seqs] bool: the rows whose chunk ends where a sample is due
    # ``starts`` / ``seq_lens`` as int32 arrays and the longest chunk, when ``_prepare`` built them already.
    starts_np: np.ndarray | None = None
    seq_lens_np: np.ndarray | None = None
    max_query_len: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


def start_compile_pool(config: EngineConfig) -> CompilePool | None:
    """On a fresh machine, compile processes for the start-up's kernels (``precompile.CompilePool``), to
    import torch and Triton while the rank sets up; a warm cache has nothing to compile and needs none."""
    return pool_if_cold(compile_processes(config)) if config.device.type == "cuda" else None


def compile_processes(config: EngineConfig) -> int:
    """Processes for compiling kernels ahead (``aphrodite.kernels.precompile``): this host's cores
    shared among the ranks, which all compile at the same time."""
    return max(1, (os.cpu_count() or 2) // max(1, config.parallel.world_size))


@dataclass
class _QueuedStep:
    """A step whose forward pass is queued, up to its sampler (what ``_sample`` needs)."""

    step_id: int
    reqs: list[RequestState]
    counts: list[int]
    starts: list[int]
    hidden: torch.Tensor | None     # None on a pipeline stage before the last
    logits: torch.Tensor | None     # the sampling rows' logits; None when no row samples
    md: SamplingMetadata | None
    sample_idx: list[int]
    rows: list[RequestState]
    want_result: bool


class ModelRunner:
    def __init__(self, config: EngineConfig, compile_pool: CompilePool | None = None) -> None:
        self.config = config
        self.device = config.device
        self.dtype = config.model.dtype
        self.kv_dtype = config.cache.kv_dtype(self.dtype)   # fp8 with --kv-cache-dtype fp8
        self.block_size = config.cache.block_size
        self.compile_pool = compile_pool if compile_pool is not None else start_compile_pool(config)
        start = time.perf_counter()
        self.model = load_model(config.model, self.device)
        logger.info("Loaded %s in %.1f s", config.model.model, time.perf_counter() - start)
        mark_startup("loaded the model")
        self.vocab_size = config.model.hf_config.vocab_size
        self.pp_size = get_pp_size()
        self.first_stage, self.last_stage = is_first_pp_rank(), is_last_pp_rank()
        # This rank's attention layers (its pipeline stage's), each with its tensor-parallel share of
        # the KV heads: what the KV cache is sized from.
        self.attn_layers = [mod for mod in self.model.modules() if isinstance(mod, Attention)]
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.inputs = StepInputs(config)
        self.lora_manager = None
        if config.lora is not None:
            from aphrodite.lora.manager import LoRAManager
            lc = config.lora
            self.lora_manager = LoRAManager(self.model, lc.max_loras, lc.max_lora_rank, lc.max_cpu_loras,
                                            self.inputs.max_tokens, self.device, self.dtype)
        # Graphs capture a whole forward pass; a pipeline stage's exchanges with its neighbours are not in it.
        self.graphs = DecodeGraphs(self) if (self.device.type == "cuda" and not config.enforce_eager
                                             and self.pp_size == 1) else None
        # This worker's records of the requests it has been sent (see ``step_plan``).
        self.requests: dict[str, RequestState] = {}
        self.block_tables = BlockTables()      # their block tables, one persistent row each
        # The last queued step's sampled ids (device) and which row each sampled request got.
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[str, int] = {}
        # Per-request sampler state on the device (penalty counts, DRY/n-gram histories, mirostat mu);
        # finished requests are dropped with the plan's finished_ids (see _sampling_metadata).
        self.sampling_state = SamplingState(self.vocab_size, config.scheduler.max_model_len, self.device)
        self.sampling_rows = StaticRowsCache()   # the parameter-only sampling tensors of the last batch
        # Eager steps of at least this many tokens run as two halves whose TP all-reduces overlap the other
        # half's compute (``_forward_overlapped``); 0 (the default) = never.
        self.overlap_min_tokens = overlap_min_tokens()
        self.overlapped_steps = 0


        self._deferred: _QueuedStep | None = None   # a step whose sampler waits for its grammar bitmask
        self._upload_bitmask = BitmaskUpload(self.device)

    # ---- KV cache -----------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.kv_dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_dim * elem for a in self.attn_layers)

    def _kv_pairs(self, num_blocks: int, alloc=torch.zeros) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (K, V) pair per attention layer of this rank, ``[num_blocks, block_size, kv_heads, head_dim]``."""
        pairs = []
        for a in self.attn_layers:
            shape = (num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
            pairs.append((alloc(shape, dtype=self.kv_dtype, device=self.device),
                          alloc(shape, dtype=self.kv_dtype, device=self.device)))
        return pairs

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        if self.device.type == "cpu":
            return cache.cpu_kvcache_space_bytes // self.kv_bytes_per_block()
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the memory that was free for us, after a
        peak-size forward pass (activations) and a full-batch sampler pass."""
        torch.cuda.synchronize()
        free_now, _ = torch.cuda.mem_get_info()
        ours = torch.cuda.memory_allocated()            # the weights, loaded after start-up
        allowed = self.config.cache.gpu_memory_utilization * (free_now + ours)
        # One round of compiling ahead for the whole start-up: the profiling pass and the forwards the
        # graphs will capture meet their uncached kernels in one dry run and compile in one batch.
        compile_ahead(self._dry_start_up, self.compile_processes(), self.compile_group(), self.compile_pool)
        mark_startup("compiled kernels ahead (profiling pass and graph forwards)")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        scratch_cache = self.profile_run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - scratch_cache
        torch.cuda.empty_cache()
        blocks = int((allowed - peak) // self.kv_bytes_per_block())
        logger.info("Memory: %.2f GiB usable, weights %.2f GiB, peak activations %.2f GiB -> %d KV blocks",
                    allowed / 2**30, ours / 2**30, (peak - ours) / 2**30, blocks)
        mark_startup("profiled peak memory")
        return max(0, blocks)

    def _dry_start_up(self) -> None:
        """Every forward pass of the start-up, run under ``compile_ahead``: the profiling pass, then the
        forwards of the graphs about to be captured (over a one-block scratch cache: they write no slot
        and read no context, and the kernels see the cache only through its strides)."""
        self.profile_run()
        if self.graphs is not None:
            self._bind(self._kv_pairs(1))
            try:
                self.graphs.dry_forwards()
                self._dry_mixed_forwards()
            finally:
                self._bind([])

    @torch.inference_mode()
    def _dry_mixed_forwards(self) -> None:
        """Forwards of small mixed prefill + decode layouts (``mixed_step_layouts``) over the graphs' empty
        input buffers (no query token, no context: the kernels only launch), so that compiling ahead meets
        the attention variants of mixed steps too."""
        if self.lora_manager is not None or not self.attn_layers:   # LoRA layers need a real step's slots
            return
        inputs, sc = self.inputs, self.config.scheduler
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        attn = self.attn_layers[0]
        layouts = mixed_step_layouts(attn.num_kv_heads, sc.max_num_seqs, sc.max_model_len, sms,
                                     attn.num_heads // attn.num_kv_heads, attn.head_dim)
        try:
            for nd, length, nseq, chunk in layouts:
                seqs, tokens = nd + nseq, nd + nseq * chunk
                if tokens > inputs.max_tokens:
                    continue
                meta = AttentionMetadata(
                    num_decodes=nd, query_start_loc=inputs.starts[1][:seqs + 1], seq_lens=inputs.seq_lens[1][:seqs],
                    block_tables=inputs.tables[1][:seqs], slot_mapping=inputs.slots[1][:tokens], max_query_len=chunk,
                    max_seq_len=length, max_decode_seq_len=length, query_start_loc_cpu=[0] * (seqs + 1),
                    seq_lens_cpu=[length] * seqs)
                with set_attention_metadata(meta):
                    self.model(inputs.ids[1][:tokens], inputs.pos[1][:tokens])
        except Exception:   # the same on every rank; those kernels then compile at first use, as before
            logger.warning("Mixed-step kernels are not compiled ahead", exc_info=True)

    def compile_processes(self) -> int:
        return compile_processes(self.config)

    def compile_group(self) -> object:
        """The ranks that share compiling ahead: this stage's tensor-parallel ranks (equal shapes), which
        reach every start-up pass together; None with one rank."""
        return get_tp_cpu_group() if get_tp_size() > 1 else None

    def profile_run(self) -> int:
        """One forward pass of a full token budget and a sampler pass over a full batch of rows,
        to measure peak activation memory. Returns the bytes of the scratch KV cache it used."""
        sc = self.config.scheduler
        n = min(sc.max_num_batched_tokens, sc.max_model_len)
        blocks = -(-n // self.block_size)
        scratch = self._kv_pairs(blocks)
        self._bind(scratch)
        host = HostBatch(np.zeros(n, np.int64), np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64),
                         [0, n], [n], np.arange(blocks, dtype=np.int32)[None, :], 0)
        ids, pos, meta = self.inputs.to_device(host)
        if self.lora_manager is not None:   # peak memory with the LoRA kernels' buffers
            self.lora_manager.state.active = True
        with torch.inference_mode(), set_attention_metadata(meta):
            if self.pp_size == 1:
                hidden = self.model(ids, pos)
            else:   # a stage on its own: made-up input from the previous stage, none sent on
                spec = intermediate_tensor_spec(n, self.config.model.hf_config.hidden_size, self.dtype)
                inter = None if self.first_stage else IntermediateTensors.from_dict(
                    {k: torch.zeros(shape, dtype=dt, device=self.device) for k, (shape, dt) in spec.items()})
                hidden = self.model(ids, pos, inter)
            if not self.last_stage:
                del hidden, inter
                self._bind([])
                return sum(k.numel() * k.element_size() * 2 for k, _ in scratch)
            rows = min(sc.max_num_seqs, n)
            logits = self.model.compute_logits(hidden[-rows:].contiguous())
            _warm_draw_kernels(logits)
            probs = torch.softmax(logits, -1, dtype=torch.float64)
            torch.sort(logits, dim=-1, descending=True)
            torch.cumsum(probs, dim=-1)
        del hidden, logits, probs
        self._bind([])
        return sum(k.numel() * k.element_size() * 2 for k, _ in scratch)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        # Zero-filled: attention reads whole blocks and masks the slots past each sequence's end,
        # and 0 * NaN from never-written memory would still poison the output.
        self.kv_caches = self._kv_pairs(num_blocks, lambda shape, dtype, device: zeroed(shape, dtype, device))
        self._bind(self.kv_caches)
        mark_startup("allocated the KV cache")
        if self.graphs is not None:
            if self.lora_manager is not None:   # graphs always hold the LoRA kernels (slot -1 rows skip them)
                self.lora_manager.state.active = True
            self.graphs.capture()
            mark_startup("captured the CUDA graphs")
        if self.compile_pool is not None:   # start-up is over: compile processes nobody took exit
            self.compile_pool.close()
            self.compile_pool = None
        if self.device.type == "cuda":
            warn_late_compiles()

    # ---- LoRA -----------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read and check an adapter (``ValueError`` if it cannot serve); False if its id is loaded."""
        if self.lora_manager is None:
            raise ValueError("LoRA adapters need the engine started with enable_lora=True (--enable-lora).")
        return self.lora_manager.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.lora_manager is not None and self.lora_manager.remove_lora(lora_int_id)

    def _bind(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, layer in enumerate(self.attn_layers):
            layer.kv_cache = caches[i] if caches else None

    # ---- one step -------------------------------------------------------------
    def _prepare(self, reqs: list[RequestState], plan: StepPlan) -> HostBatch:
        """The step's flat batch as numpy arrays (ids, positions, slots, lengths, block tables).

        Built with array operations over the plan's per-request numbers; the only per-request Python
        work left is reading each decode's input token (or noting that the step in flight samples it)
        and copying prefill chunks' token slices."""
        bs = self.block_size
        counts = plan.num_scheduled
        n = len(reqs)
        comp_list = plan.num_computed
        comp = np.array(comp_list, dtype=np.int64)
        cnt = np.array(counts, dtype=np.int64)
        starts_np = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(cnt, out=starts_np[1:])
        total = int(starts_np[-1])
        seq_lens_np = comp + cnt
        num_decodes = counts.count(1)
        all_decodes = num_decodes == n
        # Each request's known tokens: with the pending ones, whether its chunk ends where a sample is due.
        known = [len(r.all_token_ids) for r in reqs]
        samples = seq_lens_np == np.array(known, dtype=np.int64) + np.array(plan.num_pending, dtype=np.int64)
        if all_decodes:
            pos = comp
            row_of_token = np.arange(n)
        else:
            row_of_token = np.repeat(np.arange(n), cnt)
            pos = np.arange(total, dtype=np.int64) + (comp - starts_np[:-1])[row_of_token]
        ids = np.empty(total, dtype=np.int64)
        # Decodes: the token at their position, or -1 when only the step in flight knows it (it sampled it).
        if all_decodes:
            dec_rows = np.arange(n)
            dec_ids = [r.all_token_ids[c] if c < k else -1 for r, c, k in zip(reqs, comp_list, known)]
        else:
            dec_rows = np.flatnonzero(cnt == 1)
            dec_ids = [reqs[i].all_token_ids[comp_list[i]] if comp_list[i] < known[i] else -1
                       for i in dec_rows.tolist()]
        dec_ids_np = np.array(dec_ids, dtype=np.int64)
        ids[starts_np[dec_rows]] = dec_ids_np
        if not all_decodes:     # prefill chunks: a slice of known tokens each
            for i in np.flatnonzero(cnt != 1).tolist():
                c, k, t = comp_list[i], counts[i], int(starts_np[i])
                ids[t:t + k] = reqs[i].all_token_ids[c:c + k]
        width = max(r.num_blocks for r in reqs)
        tables = self.block_tables.gather(np.array([r.row for r in reqs], dtype=np.int64), width)
        slots = tables[row_of_token, pos // bs].astype(np.int64) * bs + pos % bs
        from_prev = None
        missing = np.flatnonzero(dec_ids_np < 0)
        if len(missing):
            req_rows = dec_rows[missing]
            prev_rows = self._prev_rows
            src = [prev_rows.get(reqs[i].request_id, -1) for i in req_rows.tolist()]
            if -1 in src:
                r = reqs[int(req_rows[src.index(-1)])]
                raise RuntimeError(f"Request {r.request_id} needs a token that the previous step did not sample.")
            dst = starts_np[req_rows]
            ids[dst] = 0     # placeholders, overwritten on the device
            from_prev = PrevTokens(self._prev_tokens, dst, np.array(src, dtype=np.int64), req_rows)
        return HostBatch(ids, pos, slots, starts_np.tolist(), seq_lens_np.tolist(), tables, num_decodes, from_prev,
                         samples, starts_np.astype(np.int32), seq_lens_np.astype(np.int32), max(counts))

    def execute(self, plan: StepPlan) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.queue(plan).result()

    @torch.inference_mode()
    def queue(self, plan: StepPlan, want_result: bool = True) -> StepFuture | None:
        """Enqueue one step's forward pass and sampling; the host reads the results later.

        ``want_result=False`` (tensor-parallel ranks other than the output rank) runs the same
        collectives and keeps the sampled ids on the device, but copies nothing back. With
        ``plan.grammar_pending`` only the forward pass and the logits are queued and None is returned:
        the sampler waits for the step's ``GrammarBitmask`` (``sample``), which the engine fills while
        the device runs this forward pass."""
        if self._deferred is not None:
            raise RuntimeError(f"Step {plan.step_id} arrived before the grammar bitmask of step "
                               f"{self._deferred.step_id}.")
        if len(self.requests) == len(plan.finished_ids):    # every earlier request has ended
            self.sampling_rows.clear()
        reqs, counts = apply_plan(self.requests, plan, self.block_tables), plan.num_scheduled
        self.inputs.begin_step()
        host = self._prepare(reqs, plan)
        # Rows that sample: requests whose scheduled chunk reaches their last token (pending ones
        # included). Their sampling tensors are copied to the device before the forward pass is
        # queued, so the sampler's kernels follow the model's without the GPU idling on copies.
        every_row = self.last_stage and bool(host.samples.all())
        sample_idx = (list(range(len(reqs))) if every_row else np.flatnonzero(host.samples).tolist()) \
            if self.last_stage else []
        rows = reqs if every_row else [reqs[i] for i in sample_idx]
        md = self._sampling_metadata(plan, sample_idx, rows)
        every_row = every_row and host.num_decodes == len(reqs)   # a decode step: every row samples
        last = None if every_row or not rows else to_device(
            np.asarray(host.starts, dtype=np.int64)[np.asarray(sample_idx, dtype=np.int64) + 1] - 1,
            torch.long, self.device)

        if self.lora_manager is not None:   # activate the step's adapters, each token's slot index
            self.lora_manager.set_step([r.lora_int_id for r in reqs], counts)
        eager_lora = self.lora_manager is not None and self.lora_manager.needs_eager
        if self.graphs is not None and not eager_lora and self.graphs.can_run(host):
            hidden = self.graphs.run(host)
        else:
            input_ids, positions, meta = self.inputs.to_device(host)
            split = self._overlap_split(host)
            if split:
                hidden = self._forward_overlapped(input_ids, positions, meta, split)
            else:
                with set_attention_metadata(meta):
                    hidden = self._forward(input_ids, positions)
        self.inputs.end_step()
        if not self.last_stage:   # hand this stage's output to the next one; nothing to sample here
            pp_send_tensors(hidden.to_dict())
            hidden = None

        logits = None
        if rows:
            if self.lora_manager is not None:
                self.lora_manager.set_logit_rows([r.lora_int_id for r in rows])
            logits = self.model.compute_logits(hidden if last is None else hidden[last])
        step = _QueuedStep(plan.step_id, reqs, counts, host.starts, hidden, logits, md, sample_idx, rows, want_result)
        if plan.grammar_pending:
            self._deferred = step
            return None
        return self._sample(step, plan.grammar_bitmask)

    @torch.inference_mode()
    def sample(self, mask: GrammarBitmask) -> StepFuture:
        """Sample the step queued with ``grammar_pending``, its logits masked by ``mask``."""
        step = self._deferred
        if step is None or step.step_id != mask.step_id:
            raise RuntimeError(f"A grammar bitmask for step {mask.step_id} arrived, but the step waiting for one "
                               f"is {None if step is None else step.step_id}.")
        self._deferred = None
        return self._sample(step, mask.bitmask)

    def _sample(self, step: _QueuedStep, bitmask: np.ndarray | None) -> StepFuture:
        """The sampler over the step's logits (grammar rows masked), then the host copies of its results."""
        reqs, rows = step.reqs, step.rows
        if not self.last_stage:
            return StepFuture(len(reqs), [], [], None, [None] * len(reqs))
        out = None
        if rows:
            md = step.md
            if bitmask is not None:
                if len(step.sample_idx) != len(reqs):
                    bitmask = bitmask[step.sample_idx]
                md.grammar_bitmask = self._upload_bitmask(bitmask)
            out = self.sampler(step.logits, md)
        row_ids = [r.request_id for r in rows]
        if out is not None:
            # The state takes the sampled ids while they are still on the device (no wait).
            self.sampling_state.update(row_ids, out.token_ids)
        self._prev_tokens = None if out is None else out.token_ids
        self._prev_rows = dict(zip(row_ids, range(len(row_ids))))
        prompt_lps = self._prompt_logprobs(reqs, step.counts, step.hidden, step.starts, step.want_result)
        num_top = [r.params.logprobs or 0 for r in rows] if out is not None and out.logprobs is not None else []
        return StepFuture(len(reqs), step.sample_idx, num_top, out if step.want_result else None, prompt_lps)

    # ---- large tensor-parallel steps: two halves, one's all-reduces under the other's compute -------------
    def tp_overlap(self, min_tokens: int | None = None) -> tuple[int, int]:
        """(the smallest step, in tokens, run as two overlapped halves; steps run so) after setting the
        former to ``min_tokens`` when given (0: never)."""
        if min_tokens is not None:
            self.overlap_min_tokens = max(0, int(min_tokens))
        return self.overlap_min_tokens, self.overlapped_steps

    def _overlap_split(self, host: HostBatch) -> int:
        """The sequence at which this step splits into two halves of about equal tokens, or 0 for a step
        run whole: one stage of several TP ranks, no LoRA, at least ``overlap_min_tokens`` tokens, and a
        sequence boundary that leaves each half a quarter of them or more."""
        total = len(host.ids)
        if (not self.overlap_min_tokens or total < self.overlap_min_tokens or host.num_seqs < 2
                or get_tp_size() == 1 or self.pp_size > 1 or self.lora_manager is not None):
            return 0
        starts = host.starts_np if host.starts_np is not None else np.asarray(host.starts)
        k = int(np.searchsorted(starts, total // 2))
        if k > 1 and total // 2 - starts[k - 1] < starts[k] - total // 2:
            k -= 1
        k = min(max(k, 1), host.num_seqs - 1)
        return k if min(starts[k], total - starts[k]) * 4 >= total else 0

    def _forward_overlapped(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                            split: int) -> torch.Tensor:
        """The model over sequences ``..split-1`` and ``split..`` as two halves whose all-reduces overlap
        the other half's compute (``communication.run_overlapped``); the halves' hidden states, joined."""
        t = meta.query_start_loc_cpu[split]

        def half(first: int, last: int, tokens: slice):
            part = slice_metadata(meta, first, last)

            def run() -> torch.Tensor:
                with set_attention_metadata(part):
                    return self.model(input_ids[tokens], positions[tokens])
            return run

        a, b = run_overlapped(half(0, split, slice(0, t)), half(split, meta.num_seqs, slice(t, None)))
        self.overlapped_steps += 1
        return torch.cat([a, b])

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | IntermediateTensors:
        """The model on this rank's stage: after the first stage its input is the previous stage's
        hidden states and residual, received here (same token count as this step)."""
        if self.pp_size == 1:
            return self.model(input_ids, positions)
        inter = None
        if not self.first_stage:
            spec = intermediate_tensor_spec(input_ids.shape[0], self.config.model.hf_config.hidden_size, self.dtype)
            inter = IntermediateTensors.from_dict(pp_recv_tensors(spec, device=self.device))
        return self.model(input_ids, positions, inter)

    # ---- sampler inputs (i16: the one call site) --------------------------------------------------
    def _sampling_metadata(self, plan: StepPlan, sample_idx: list[int], rows: list[RequestState]):
        """The sampler's tensors for this step's sampling rows (None when no row samples), after dropping
        the sampler state of requests that finished. A preempted request keeps its state: its tokens do
        not change, and mirostat's mu cannot be rebuilt."""
        for rid in plan.finished_ids:
            self.sampling_state.remove(rid, finished=True)
        if not rows:
            return None
        return build_sampling_metadata(rows, self.vocab_size, self.device, self.sampling_state,
                                       cache=self.sampling_rows)

    def _prompt_logprobs(self, reqs: list[RequestState], counts: list[int], hidden: torch.Tensor,
                         starts: list[int], want_result: bool = True) -> list[list[PositionLogprobs] | None]:
        """Log-probabilities of prompt tokens 1.. under the positions computed in this chunk.

        Every tensor-parallel rank computes the logits (an all-gather); only a rank that reports
        results turns them into log-probabilities."""
        result: list[list[PositionLogprobs] | None] = [None] * len(reqs)
        for i in [i for i, r in enumerate(reqs) if r.params.prompt_logprobs is not None]:
            r, n = reqs[i], counts[i]
            if not r.wants_prompt_logprobs:
                continue
            c = r.num_computed_tokens
            first = max(c, r.num_prompt_logprobs - 1)   # position p predicts prompt token p + 1
            last = min(c + n, r.num_prompt_tokens - 1)
            if first >= last:
                result[i] = []
                continue
            base = starts[i] - c
            if self.lora_manager is not None:
                self.lora_manager.set_logit_rows([r.lora_int_id] * (last - first))
            logits = self.model.compute_logits(hidden[base + first:base + last])
            r.num_prompt_logprobs = max(r.num_prompt_logprobs, last + 1)
            if not want_result:
                continue
            targets = torch.tensor(r.prompt_token_ids[first + 1:last + 1], device=self.device)
            k = r.params.prompt_logprobs
            lp, rk, ti, tv = gather_logprobs(logits, targets, k)
            lp, rk, tgt = lp.tolist(), rk.tolist(), targets.tolist()
            ti = ti.tolist() if ti is not None else [[]] * len(tgt)
            tv = tv.tolist() if tv is not None else [[]] * len(tgt)
            result[i] = [(tgt[j], lp[j], rk[j], list(zip(ti[j], tv[j]))) for j in range(len(tgt))]
        return result
