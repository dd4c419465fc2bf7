"""The one-shot all-reduce kernel under TRITON_INTERPRET=1, one process playing every rank's peers.

The peers' side of the protocol (stage the data in the half of this epoch's parity, raise the
flag in our signal array) is written by the test; the kernel must then stage its own input,
raise its flag in every peer's signal array, and return the rank-ordered fp32 sum.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from spawn import spawn_ranks

from aphrodite.kernels import custom_all_reduce as car

HALF_BYTES = 4 * 300 * car.BLOCK
# The interpreter rounds fp32 -> bf16/fp16 by truncation, the GPU (and the reference) to nearest:
# one unit in the last place apart at most. fp32 is exact.
TOL = {torch.float32: dict(atol=0, rtol=0), torch.bfloat16: dict(atol=0, rtol=2 ** -7),
       torch.float16: dict(atol=0, rtol=2 ** -10)}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class _World:
    """Every rank's staging buffer and signal array, as CPU tensors; the kernel runs as ``rank``."""

    def __init__(self, world: int, rank: int) -> None:
        self.world, self.rank = world, rank
        self.bufs = [torch.zeros(2 * HALF_BYTES, dtype=torch.uint8) for _ in range(world)]
        self.sigs = [torch.zeros(world, car.MAX_PROGRAMS, dtype=torch.int32) for _ in range(world)]
        self.counter = torch.zeros(car.MAX_PROGRAMS, dtype=torch.int32)
        self.buf_ptrs = torch.tensor([b.data_ptr() for b in self.bufs], dtype=torch.int64)
        self.sig_ptrs = torch.tensor([s.data_ptr() for s in self.sigs], dtype=torch.int64)

    def chunks(self, n: int) -> list[tuple[int, slice]]:
        """(epoch, element range) of each program of the next call: every program keeps its own epoch."""
        programs, tiles = car.launch_layout(n)
        step = tiles * car.BLOCK
        return [((int(self.counter[i]) + 1) & car.EPOCH_MASK, slice(i * step, min((i + 1) * step, n)))
                for i in range(programs)]

    def staged(self, peer: int, epoch: int, x: torch.Tensor, rows: slice) -> torch.Tensor:
        elems = HALF_BYTES // x.element_size()
        return self.bufs[peer].view(x.dtype)[(epoch % 2) * elems:][rows]

    def peers_arrive(self, inputs: list[torch.Tensor], ahead: bool = False) -> None:
        """What the peers do first: stage each chunk in its epoch's half, raise the flag in our array."""
        for program, (epoch, rows) in enumerate(self.chunks(inputs[0].numel())):
            for p, x in enumerate(inputs):
                if p != self.rank:
                    self.staged(p, epoch, x, rows).copy_(x[rows])
                    self.sigs[self.rank][p, program] = (epoch + ahead) & car.EPOCH_MASK

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return car.one_shot_all_reduce(x, torch.empty_like(x), self.buf_ptrs, self.sig_ptrs, self.counter,
                                       self.rank, self.world, HALF_BYTES)


@pytest.mark.parametrize("world, rank, dtype", [(2, 0, torch.bfloat16), (4, 2, torch.float32),
                                                (2, 1, torch.float16)])
def test_one_shot_matches_reference_over_epochs(world: int, rank: int, dtype: torch.dtype) -> None:
    w = _World(world, rank)
    gen = torch.Generator().manual_seed(world + rank)
    # Two tiles; a partial tile; many tiles over fewer programs than tiles (3 tiles each).
    for n in [4096, 1500, 300 * car.BLOCK, 3 * car.BLOCK]:
        inputs = [torch.randn(n, generator=gen).to(dtype) for _ in range(world)]
        chunks = w.chunks(n)
        assert len(chunks) == {4096: 2, 1500: 1, 300 * car.BLOCK: 100, 3 * car.BLOCK: 3}[n]
        w.peers_arrive(inputs)
        out = w.run(inputs[rank])
        torch.testing.assert_close(out.float(), car.one_shot_all_reduce_ref(inputs).float(), **TOL[dtype])
        for program, (epoch, rows) in enumerate(chunks):
            assert torch.equal(w.staged(rank, epoch, inputs[rank], rows), inputs[rank][rows])  # for the peers
            assert int(w.counter[program]) == epoch
            for p in range(world):   # our flag raised in every rank's signal array
                assert int(w.sigs[p][rank, program]) == epoch


def test_peer_one_call_ahead_and_epoch_wrap() -> None:
    w = _World(2, 0)
    x = [torch.randn(2 * car.BLOCK), torch.randn(2 * car.BLOCK)]   # two programs
    w.counter.fill_(car.EPOCH_MASK)          # the next epoch wraps to 0 (an even half)
    w.peers_arrive(x, ahead=True)            # the peer already raised the flag of the call after
    torch.testing.assert_close(w.run(x[0]), x[0] + x[1], atol=0, rtol=0)
    assert (w.counter[:2] == 0).all() and (w.sigs[1][0, :2] == 0).all()


def test_message_larger_than_the_buffer_is_refused() -> None:
    w = _World(2, 0)
    with pytest.raises(ValueError, match="exceed"):
        w.run(torch.zeros(HALF_BYTES // 4 + 1))


_COMPILE_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from aphrodite.kernels import custom_all_reduce as car
sig = {"inp_ptr": "*bf16", "out_ptr": "*bf16", "buf_ptrs": "*i64", "sig_ptrs": "*i64", "counter_ptr": "*i32",
       "n": "i32", "half_stride": "i64", "tiles": "i32", "RANK": "constexpr", "WORLD": "constexpr",
       "MAX_PROGRAMS": "constexpr", "EPOCH_MASK": "constexpr", "BLOCK": "constexpr"}
consts = {"RANK": 1, "WORLD": 2, "MAX_PROGRAMS": car.MAX_PROGRAMS, "EPOCH_MASK": car.EPOCH_MASK, "BLOCK": car.BLOCK}
# What the launcher specialises for 16-byte aligned tensors and sizes divisible by 16.
attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
kernel = triton.compile(ASTSource(JITFunction(car._one_shot_kernel), sig, consts, attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
sys.stdout.write(kernel.asm["ptx"])
"""


def test_compiles_for_h200_with_system_scope_flags_and_vector_loads() -> None:
    """Compiled ahead of time for sm_90 (no GPU needed; in a fresh process, away from the
    interpreter): the flags are system-scope release exchanges and acquire loads (the peers are
    other GPUs), and the data moves 16 bytes at a time."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert ptx.count("atom.global.sys.release.exch.b32") == 2          # one flag per rank
    assert ptx.count("ld.global.sys.acquire.b32") >= 2                 # polling each peer
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert "ld.volatile" not in ptx and "bar.sync" in ptx


SIZES = [4096, 1500, 70 * car.BLOCK, 8, 3 * car.BLOCK, 4096, 2048]


def _rank_worker(rank: int, world_size: int, init_method: str, bufs: list[torch.Tensor],
                 sigs: list[torch.Tensor], out_dir: str) -> None:
    """One rank, in its own process: the shared-memory segments are mapped at this process's own
    addresses (as CUDA IPC maps the peers' buffers), and the calls run back to back."""
    os.environ["TRITON_INTERPRET"] = "1"
    buf_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    sig_ptrs = torch.tensor([s.data_ptr() for s in sigs], dtype=torch.int64)
    counter = torch.zeros(car.MAX_PROGRAMS, dtype=torch.int32)
    outs = []
    for call, n in enumerate(SIZES):
        x = torch.randn(n, generator=torch.Generator().manual_seed(100 * call + rank))
        outs.append(car.one_shot_all_reduce(x, torch.empty_like(x), buf_ptrs, sig_ptrs, counter, rank,
                                            world_size, HALF_BYTES))
    torch.save(outs, f"{out_dir}/out{rank}.pt")


def test_two_processes_back_to_back(tmp_path: Path) -> None:
    """The whole protocol with real concurrency: two processes, each its own address space, seven
    calls of changing sizes back to back (a rank may run a call ahead of its peer), every result
    equal to the reference."""
    world = 2
    bufs = [torch.zeros(2 * HALF_BYTES, dtype=torch.uint8).share_memory_() for _ in range(world)]
    sigs = [torch.zeros(world, car.MAX_PROGRAMS, dtype=torch.int32).share_memory_() for _ in range(world)]
    spawn_ranks(_rank_worker, world, tmp_path, bufs, sigs, str(tmp_path), timeout=240)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    for call, n in enumerate(SIZES):
        inputs = [torch.randn(n, generator=torch.Generator().manual_seed(100 * call + r)) for r in range(world)]
        expected = car.one_shot_all_reduce_ref(inputs)
        for r in range(world):
            assert torch.equal(outs[r][call], expected), (call, r)
