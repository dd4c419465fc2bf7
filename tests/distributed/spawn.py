"""Run a function in N spawned CPU processes joined by gloo, and surface any child's traceback."""
from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _child(fn: Callable[..., None], rank: int, world_size: int, tmp: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    try:
        fn(rank, world_size, f"file://{tmp}/rdv", *args)
    except BaseException:
        Path(f"{tmp}/rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Leave without the interpreter's teardown: gloo's background threads occasionally abort it
    # ("terminate called without an active exception") after all work is done.
    os._exit(0)


def spawn_ranks(fn: Callable[..., Any], world_size: int, tmp: Path, *args: Any, timeout: float = 90) -> None:
    """``fn(rank, world_size, init_method, *args)`` in ``world_size`` spawned processes; raises
    with the children's tracebacks when one fails or hangs past ``timeout`` seconds."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, str(tmp), args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "\n".join(f.read_text() for f in sorted(tmp.glob("rank*.err")))
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"
