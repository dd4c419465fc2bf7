"""Compile a start-up's Triton kernels in parallel processes instead of one after another.

A cold start (empty Triton cache, as on a fresh machine) spends most of its time compiling kernel
variants one at a time: every graph-captured batch size and the peak-size profiling pass each meet a
few new specializations. ``deferred_compiles()`` runs such a pass "dry": a Triton launch whose kernel is
not in the on-disk cache is skipped and its specialization recorded (Triton's ``jit_cache_hook``);
``compile_pending()`` then compiles every recorded specialization in a pool of processes (compiling needs
no GPU), filling the same on-disk cache, so the real pass that follows only loads binaries. Launches of
kernels already cached run normally during the dry pass. Kernels that synchronize ranks (the custom
all-reduce) are never skipped: a rank that skipped one while its peer launched it would leave the peer
waiting. Any failure here only means the kernel compiles later, in the real pass, as it always did.
Off with ``APHRODITE_PARALLEL_COMPILE=0``.

Ranks of one host meet the same specializations (tensor-parallel shards have equal shapes): given a
process group of them, the ranks pool what their dry passes recorded, each compiles its share of the
union, and all wait until every share is in the cache, so no kernel is compiled twice and every core
works on a different one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Kernels that wait on other ranks: they must launch on every rank or on none.
NEVER_DEFER = ("custom_all_reduce",)
_DEFERRING = False


def enabled() -> bool:
    return os.environ.get("APHRODITE_PARALLEL_COMPILE", "1").strip().lower() not in ("0", "false", "no", "")


@dataclass
class PendingCompiles:
    """Specializations recorded during a dry pass: (module, function name, Triton's JSON data)."""
    target: tuple[str, int, int] | None = None
    specs: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    skipped: int = 0     # launches skipped


def _parse(jit_fn, data: str) -> tuple[dict, dict, dict, dict]:
    """Triton's ``JITFunction.preload`` parsing of serialized specialization data, without a device."""
    import triton.language as tl

    obj = json.loads(data)
    constexprs = {tuple(k): (tl.dtype(v) if tl.dtype.is_dtype(v) else
                             tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v)
                  for k, v in zip(obj["constant_keys"], obj["constant_vals"])}
    attrs = dict(zip(map(tuple, obj["attrs_keys"]), obj["attrs_vals"]))
    signature = {k: tuple(v) if isinstance(v, list) else v for k, v in obj["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in obj["options"].items()}
    return signature, constexprs, attrs, options


def _source_and_options(jit_fn, data: str, target):
    from triton.compiler.compiler import make_backend

    signature, constexprs, attrs, options = _parse(jit_fn, data)
    backend = make_backend(target)
    if jit_fn.is_gluon():     # Gluon kernels (w4_wgmma, gemv_gluon) compile from their own source type
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    else:
        from triton.compiler import ASTSource

    return ASTSource(jit_fn, signature, constexprs, attrs), backend, backend.parse_options(options)


def _on_disk(jit_fn, data: str, target) -> bool:
    """Whether Triton's cache already holds this specialization (then the dry pass may just launch it)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key, get_cache_manager

    src, backend, options = _source_and_options(jit_fn, data, target)
    key = get_cache_key(src, backend, options, get_cache_invalidating_env_vars())
    manager = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
    return manager.get_group(f"{src.name[:150]}.json") is not None


@contextmanager
def deferred_compiles() -> Iterator[PendingCompiles]:
    """Within the block, Triton launches of uncached kernels are skipped and recorded (see the module doc)."""
    pending = PendingCompiles()
    if not enabled():
        yield pending
        return
    try:
        from triton import knobs
        from triton.runtime.driver import driver
    except ImportError:   # pragma: no cover - CPU installs without Triton
        yield pending
        return
    target = driver.active.get_current_target()
    pending.target = (target.backend, target.arch, target.warp_size)
    previous = knobs.runtime.jit_cache_hook

    def hook(**kw) -> bool:
        try:
            fn, data = kw["fn"], kw["compile"]["specialization_data"]
            if data in pending.specs:   # met before in this pass: known uncached (the cache lookup costs ~ms)
                pending.skipped += 1
                return True
            if any(name in fn.module for name in NEVER_DEFER) or _on_disk(fn.jit_function, data, target):
                return False
        except Exception:   # an internal Triton change: compile here, as without this module
            return False
        pending.specs[data] = (fn.module, fn.name, data)
        pending.skipped += 1
        return True      # skip: no compile now, no launch

    global _DEFERRING
    knobs.runtime.jit_cache_hook = hook
    _DEFERRING = True
    try:
        yield pending
    finally:
        knobs.runtime.jit_cache_hook = previous
        _DEFERRING = False


def warn_late_compiles() -> None:
    """From now on, log a warning for each Triton kernel variant compiled at first use (not found in the
    on-disk cache): start-up's compiling ahead missed it, and the step that meets it waits seconds. Triton
    calls the hook only when a variant is new to this process, so the steady state pays nothing."""
    if not enabled():
        return
    try:
        from triton import knobs
        from triton.runtime.driver import driver
    except ImportError:   # pragma: no cover - CPU installs without Triton
        return
    target = driver.active.get_current_target()

    def hook(**kw) -> bool:
        try:
            fn, data = kw["fn"], kw["compile"]["specialization_data"]
            if not _on_disk(fn.jit_function, data, target):
                _, constexprs, attrs, _ = _parse(fn.jit_function, data)
                names = fn.jit_function.arg_names
                spec = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1 and k[0] < len(names)}
                logger.warning("Triton kernel %s compiles at first use (missed by compiling ahead): %s; "
                               "specialized ints (1 or multiples of 16): %s", fn.name, spec,
                               sorted(names[k[0]] for k in attrs if len(k) == 1 and k[0] < len(names)
                                      and not names[k[0]].endswith("_ptr")))
        except Exception as e:   # a diagnostic only: never in the way of the compile
            logger.warning("Could not check whether a Triton kernel was compiled ahead: %r", e)
        return False

    knobs.runtime.jit_cache_hook = hook


def deferring() -> bool:
    """True inside ``deferred_compiles``: kernel launches may be skipped, so nothing may be timed."""
    return _DEFERRING


def compile_ahead(dry_pass: Callable[[], object], processes: int, group: Any = None,
                  pool: CompilePool | None = None) -> None:
    """Run ``dry_pass`` with uncached Triton launches skipped, then compile what it met in parallel, so
    that running the pass for real afterwards only loads binaries.

    ``group``: a (gloo) process group of ranks on this host that call this together: they share the
    compiling (see the module doc) and return together. ``pool``: compile processes started earlier."""
    if not enabled():
        return
    start = time.perf_counter()
    with deferred_compiles() as pending:
        dry_pass()
    dry_s = time.perf_counter() - start
    mine, total = (pending, len(pending.specs)) if group is None else share_pending(pending, group)
    logger.info("Dry pass: %.1f s, %d launches skipped; %d uncached Triton kernel variants%s", dry_s,
                pending.skipped, total, "" if group is None else f" ({len(mine.specs)} compiled by this rank)")
    compile_pending(mine, processes, pool)
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)   # every rank's share is in the cache before any real pass


def share_pending(pending: PendingCompiles, group: Any) -> tuple[PendingCompiles, int]:
    """This rank's share of the union of what every rank of ``group`` recorded, and the union's size.
    Collective: every rank of the group calls it, recorded something or not. Ranks that do not share
    one on-disk cache (other hosts, as with Ray, or other cache directories) or compile for different
    targets keep their own lists."""
    import socket

    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)
    everyone: list[Any] = [None] * size
    where = (socket.gethostname(), _cache_dir())
    dist.all_gather_object(everyone, (where, pending.target, pending.specs), group=group)
    targets = {t for _, t, specs in everyone if specs}
    if len(targets) > 1 or len({w for w, _, _ in everyone}) > 1:
        return pending, len(pending.specs)
    union: dict[str, tuple[str, str, str]] = {}
    for _, _, specs in everyone:
        union.update(specs)
    keys = sorted(union)
    target = next(iter(targets), pending.target)
    return PendingCompiles(target, {k: union[k] for i, k in enumerate(keys) if i % size == rank}), len(keys)


def _compile_one(module: str, name: str, data: str, target: tuple[str, int, int]) -> float:
    """Compile one specialization into the on-disk cache, then its host-side launcher (a small C module
    Triton builds with the system compiler the first time a signature is launched), which lands in the
    same cache; its seconds. The launcher needs the GPU driver's library on this host: without it (a
    machine with no GPU) only the kernel is built, and the engine builds the launcher at first launch."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    start = time.perf_counter()
    fn = getattr(importlib.import_module(module), name)
    jit_fn = fn if isinstance(fn, JITFunction) else JITFunction(fn)
    gpu = GPUTarget(*target)
    src, _, options = _source_and_options(jit_fn, data, gpu)
    kernel = triton.compile(src, target=gpu, options=options.__dict__)
    if gpu.backend == "cuda":
        try:
            from triton.backends.nvidia.driver import CudaLauncher

            CudaLauncher(src, kernel.metadata)
        except Exception:
            pass
    return time.perf_counter() - start


def _spawn() -> subprocess.Popen:
    """A compile process: it imports torch and Triton, then waits for one job line on its stdin (EOF: exit)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile for the GPU
    return subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


class CompilePool:
    """Compile processes started before the dry pass, so that their imports of torch and Triton (seconds
    each) overlap the engine's own start-up instead of delaying the compiling. Each takes one job; the
    ones ``compile_pending`` does not take exit when the pool is closed."""

    def __init__(self, processes: int) -> None:
        self.children = [_spawn() for _ in range(max(0, processes))]

    def take(self, n: int) -> list[subprocess.Popen]:
        taken = [c for c in self.children if c.poll() is None][:n]
        self.children = [c for c in self.children if c not in taken]
        return taken

    def close(self) -> None:
        """Close the idle children's stdin: each reads EOF and exits on its own (not waited for: an
        interpreter with torch and Triton loaded took ~4 s to exit, at the end of a cold start)."""
        children, self.children = self.children, []
        for child in children:
            try:
                child.stdin.close()
            except OSError:
                child.kill()


def _cache_dir() -> str | None:
    """Triton's on-disk cache directory (None without Triton)."""
    try:
        from triton import knobs

        return os.path.abspath(knobs.cache.dir)
    except (ImportError, AttributeError):
        return None


def cache_looks_cold(threshold: int = 16) -> bool:
    """Whether Triton's on-disk cache holds fewer than ``threshold`` entries (a fresh machine), when
    starting compile processes ahead (``CompilePool``) pays."""
    directory = _cache_dir()
    if directory is None:
        return False
    try:
        with os.scandir(directory) as entries:
            return sum(1 for _ in zip(range(threshold), entries)) < threshold
    except OSError:   # not created yet
        return True


def pool_if_cold(processes: int) -> CompilePool | None:
    """A ``CompilePool`` of ``processes`` when compiling ahead is on and the cache looks cold, else None."""
    return CompilePool(processes) if enabled() and cache_looks_cold() else None


def compile_pending(pending: PendingCompiles, processes: int, pool: CompilePool | None = None) -> None:
    """Compile what a dry pass recorded in ``processes`` child processes (``python -m`` this module, so no
    user script is re-imported), taken from ``pool`` where it has them; a failure is logged and left to
    the real pass."""
    if not pending.specs or pending.target is None:
        return
    start = time.perf_counter()
    specs = list(pending.specs.values())
    processes = max(1, min(processes, len(specs)))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"target": pending.target, "specs": specs}, f)
    children = pool.take(processes) if pool is not None else []
    warm = len(children)
    try:
        children += [_spawn() for _ in range(processes - warm)]
        for i, child in enumerate(children):
            child.stdin.write(f"{f.name} {i} {processes}\n")
            child.stdin.flush()
        done = 0
        serial = 0.0
        for child in children:
            out, err = child.communicate()
            if err.strip():
                logger.debug("Compile process: %s", err[-2000:])
            for line in out.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    done, serial = done + r["done"], serial + r["seconds"]
    finally:
        os.unlink(f.name)
    logger.info("Compiled %d Triton kernel variants in %.1f s on %d processes (%d started ahead; %.1f s one after "
                "another)%s", done, time.perf_counter() - start, processes, warm, serial,
                f"; {len(specs) - done} left to compile on first use" if done < len(specs) else "")


def _main(path: str, shard: int, shards: int) -> None:
    with open(path) as f:
        job = json.load(f)
    target = tuple(job["target"])
    done = 0
    seconds = 0.0
    for i, (module, name, data) in enumerate(job["specs"]):
        if i % shards != shard:
            continue
        try:
            seconds += _compile_one(module, name, data, target)
            done += 1
        except Exception as e:   # the parent logs it; the engine compiles this one at first use
            print(f"{module}.{name}: {type(e).__name__}: {e}", file=sys.stderr)
    print(json.dumps({"done": done, "seconds": seconds}), flush=True)


def _serve() -> None:
    """A compile process: the slow imports first, then one job line ``path shard shards`` from stdin."""
    import torch  # noqa: F401
    import triton  # noqa: F401

    line = sys.stdin.readline().split()
    if len(line) == 3:
        _main(line[0], int(line[1]), int(line[2]))


if __name__ == "__main__":
    _serve()
