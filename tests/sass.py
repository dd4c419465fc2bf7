"""What an sm_90 kernel compiled on this CPU turned into: its SASS and resource usage, read by the cuobjdump
that ships inside Triton's NVIDIA backend (the kernel tests check instructions, spills and registers)."""
from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Any


def cuobjdump() -> str | None:
    """Path of Triton's bundled cuobjdump, or None where this Triton has none (the tests then skip)."""
    import triton.backends.nvidia as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def sass_and_usage(kernel: Any) -> tuple[str, str]:
    """``(sass, res-usage)`` text of a compiled Triton/Gluon kernel's cubin."""
    tool = cuobjdump()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return tuple(subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout
                     for flag in ("-sass", "-res-usage"))
