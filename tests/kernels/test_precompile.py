"""Kernels compiled ahead in child processes land in Triton's on-disk cache, where the engine's
real pass finds them (``aphrodite.kernels.precompile``). Compiling needs no GPU: the child builds
an sm_90 binary here on the CPU, and the test reads the cache Triton itself would consult."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def test_recorded_specialization_compiles_in_a_child_into_the_shared_cache(tmp_path, monkeypatch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, serialize_specialization_data

    from aphrodite.kernels import precompile
    from aphrodite.kernels.rmsnorm import _rms_norm_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    target = ("cuda", 90, 32)
    jit_fn = JITFunction(_rms_norm_kernel)
    names = jit_fn.arg_names
    signature = {n: t for n, t in zip(names, ["*bf16"] * 6 + ["i32", "fp32", "fp32"] + ["i32"] * 4
                                      + ["constexpr"] * 4)}
    constants = {(names.index("BLOCK"),): 4096, (names.index("HAS_RESIDUAL"),): True,
                 (names.index("GEMMA"),): False, (names.index("PRE_NORM"),): False}
    options = make_backend(GPUTarget(*target)).parse_options({"num_warps": 8})
    data = serialize_specialization_data(f"{_rms_norm_kernel.__module__}.{_rms_norm_kernel.__qualname__}",
                                         signature, constants, {}, options, "key")
    assert not precompile._on_disk(jit_fn, data, GPUTarget(*target))

    pending = precompile.PendingCompiles(target, {data: (_rms_norm_kernel.__module__, "_rms_norm_kernel", data)})
    pool = precompile.CompilePool(2)      # started ahead; the job takes one, closing ends the other
    children = list(pool.children)
    precompile.compile_pending(pending, processes=1, pool=pool)
    assert len(pool.children) == 1 and children[0].returncode == 0
    pool.close()
    assert children[1].wait(timeout=60) == 0 and not pool.children

    assert precompile._on_disk(jit_fn, data, GPUTarget(*target))
    assert list((tmp_path / "cache").rglob("*.cubin")), "the child wrote no binary"

    # Triton itself, given what its JIT passes to compile() (the original values, not the JSON round trip),
    # must report a cache hit: the real pass then only loads the child's binary.
    from triton import knobs
    from triton.compiler import ASTSource

    hits = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: hits.append(kw["cache_hit"]))
    triton.compile(ASTSource(jit_fn, signature, constants, {}), target=GPUTarget(*target), options=options.__dict__)
    assert hits == [True]


def test_gluon_kernel_compiles_ahead_into_the_cache_its_launch_reads(tmp_path, monkeypatch):
    """Gluon kernels (the Hopper W4A16/GEMV kernels) go through their own source type, so the dry pass finds
    them cached after the child compiled them instead of recompiling them on every start."""
    pytest.importorskip("triton.experimental.gluon")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import serialize_specialization_data

    from aphrodite.kernels import precompile
    from aphrodite.kernels.gemv_gluon import _gemv_fp8_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    target = ("cuda", 90, 32)
    names = _gemv_fp8_kernel.arg_names
    types = ["*bf16", "*fp8e4nv", "*fp32", "*bf16", "*bf16"] + ["i32"] * 5 + ["constexpr"] * 5
    signature = dict(zip(names, types))
    constants = {(names.index(k),): v for k, v in
                 dict(ROWS=1, HAS_BIAS=False, BLOCK_N=16, STAGES=4, num_warps=4).items()}
    options = make_backend(GPUTarget(*target)).parse_options({"num_warps": 4})
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t != "constexpr"}   # as launched
    data = serialize_specialization_data(f"{_gemv_fp8_kernel.__module__}.{_gemv_fp8_kernel.__name__}",
                                         signature, constants, aligned, options, "key")
    assert not precompile._on_disk(_gemv_fp8_kernel, data, GPUTarget(*target))
    pending = precompile.PendingCompiles(target, {data: (_gemv_fp8_kernel.__module__, "_gemv_fp8_kernel", data)})
    precompile.compile_pending(pending, processes=1)
    assert precompile._on_disk(_gemv_fp8_kernel, data, GPUTarget(*target))


def _share_on_rank(rank: int, world_size: int, init_method: str, out_dir: str, same_host: bool) -> None:
    import json
    import socket

    import torch.distributed as dist

    from aphrodite.kernels import precompile

    if not same_host:   # as Ray ranks on two hosts: each host's cache needs its own compiles
        host = f"host{rank}"
        socket.gethostname = lambda: host

    dist.init_process_group("gloo", init_method=init_method, world_size=world_size, rank=rank)
    recorded = [{"a": ("m", "f", "a"), "b": ("m", "f", "b")}, {"b": ("m", "f", "b"), "c": ("m", "g", "c")}][rank]
    mine, total = precompile.share_pending(precompile.PendingCompiles(("cuda", 90, 32), recorded), dist.group.WORLD)
    with open(f"{out_dir}/share{rank}.json", "w") as f:
        json.dump({"target": list(mine.target), "keys": sorted(mine.specs), "total": total}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("same_host", [True, False])
def test_ranks_share_the_union_of_their_recorded_kernels(tmp_path, same_host: bool):
    """Two ranks of one host that recorded overlapping specializations compile each one exactly once
    between them; ranks on different hosts compile what each recorded."""
    import json

    from tests.distributed.spawn import spawn_ranks

    spawn_ranks(_share_on_rank, 2, tmp_path, str(tmp_path), same_host)
    shares = [json.loads((tmp_path / f"share{r}.json").read_text()) for r in range(2)]
    assert shares[0]["target"] == ["cuda", 90, 32]
    if not same_host:
        assert [s["keys"] for s in shares] == [["a", "b"], ["b", "c"]]
        return
    assert [s["total"] for s in shares] == [3, 3]
    assert sorted(shares[0]["keys"] + shares[1]["keys"]) == ["a", "b", "c"]
    assert shares[0]["keys"] and shares[1]["keys"]
