"""Build the C files of this folder (``cpu_ops.c``, ``gguf_ops.c``, ...) into one shared library once
per machine and load it with ctypes.

Plain C and the system compiler keep the build to about a second (no PyTorch headers), and
ctypes needs no Python extension ABI. The library is compiled with ``-march=native``, so it
is cached per source, compiler and CPU. It links the libgomp that PyTorch ships, so both
share one OpenMP thread pool instead of two pools fighting for the same cores. Anything
that goes wrong (no compiler, an unusual platform) leaves the PyTorch path in charge:
``load_library()`` then returns None and logs why once.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from aphrodite.utils import cache_dir

logger = logging.getLogger(__name__)

# Every C file here goes into the one library (one build, one cache key, one ctypes handle).
SOURCES = tuple(sorted(Path(__file__).parent.glob("*.c")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))   # part of the cache key, not of the command
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
# libmvec (glibc's vector math) backs the vectorized expf on x86-64.
_LIBS = ["-lmvec", "-lm"] if platform.machine() == "x86_64" else ["-lm"]


def _torch_libgomp() -> str | None:
    """PyTorch's own libgomp, if the wheel bundles one (Linux wheels do)."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    return found[0] if found else None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _build(cc: str, target: Path, extra_flags: tuple[str, ...]) -> None:
    gomp = _torch_libgomp()
    cmd = [cc, *_FLAGS, *extra_flags, *map(str, SOURCES), "-o"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        link = [gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"] if gomp else []
        subprocess.run([*cmd, str(out), *link, *_LIBS], check=True, capture_output=True, text=True)
        os.replace(out, target)   # atomic: concurrent builders never see a half-written file


@cache
def load_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be used here (reason logged once).

    ``extra_flags`` go to the compiler after the defaults (the tests build the portable
    variant with ``-mno-avx512f`` to check the code paths other CPUs take)."""
    if os.environ.get("APHRODITE_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        logger.info("CPU C kernels are built on Linux x86_64/aarch64 only; using PyTorch ops")
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("No C compiler found (set CC or install gcc); CPU decode uses PyTorch ops")
        return None
    key = hashlib.sha256()
    flags = " ".join(_FLAGS + list(extra_flags) + _LIBS)
    for part in (*(src.read_bytes() for src in (*SOURCES, *HEADERS)), cc.encode(), flags.encode(),
                 _cpu_signature().encode(), str(_torch_libgomp()).encode()):
        key.update(part)
    target = cache_dir("kernels") / f"cpu_ops-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(cc, target, extra_flags)
            logger.info("Built CPU kernels: %s", target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("Could not build the CPU C kernels (%s); CPU decode uses PyTorch ops",
                       detail.strip()[:500])
        return None
