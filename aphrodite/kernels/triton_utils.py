"""Optional Triton import and the choice between a Triton kernel and its PyTorch reference.

Kernels are written as plain module-level functions and wrapped in ``LazyKernel``, which builds the
compiled (``JITFunction``) or interpreted (``InterpretedFunction``) form on first use for the device
at hand. Deciding at launch time rather than at import time means ``TRITON_INTERPRET=1`` takes effect
even when some other module imported the kernels first, and the package imports without Triton.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

try:  # Triton is optional: CPU-only installs use the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

    class _TLStub:
        """Lets kernel signatures (``x: tl.constexpr``) evaluate without Triton installed."""

        constexpr = Any

    tl = _TLStub()  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "DeviceFunction", "LazyKernel", "cdiv", "interpret_mode", "next_pow2", "tl", "triton",
           "use_triton"]


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (the tests' mode)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for tensors on CUDA, or on CPU under the interpreter; else the reference."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpret_mode()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class LazyKernel:
    """A Triton kernel compiled for CUDA or interpreted on CPU, chosen by the launch device."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def __call__(self, device: torch.device) -> Any:
        """The launchable kernel for ``device``: use as ``kernel(t.device)[grid](*args)``."""
        if device.type == "cuda":
            if self._compiled is None:
                from triton.runtime.jit import JITFunction

                self._compiled = JITFunction(self.fn)
            return self._compiled
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            _prepare_interpreter()
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted


class DeviceFunction(triton.runtime.jit.JITFunction if HAS_TRITON else object):  # type: ignore[misc]
    """A ``@triton.jit`` helper that compiled kernels inline and interpreted kernels call as Python.

    (``triton.jit`` picks one of the two when a module is imported; the kernels here pick at
    launch, see ``LazyKernel``.)"""

    def __call__(self, *args, **kwargs):   # reached only from a kernel run by the interpreter
        return self.fn(*args, **kwargs)


_INTERPRETER_READY = False


def _prepare_interpreter() -> None:
    """Make Triton 3.6's CPU interpreter usable whatever the import order and NumPy version.

    * ``triton.jit`` decides compiled vs interpreted when a function is decorated, so if Triton was
      imported before ``TRITON_INTERPRET=1`` was set, ``tl.sum``/``tl.max``/``tl.zeros``... are compiled
      ``JITFunction`` objects that refuse to run on CPU. While an interpreted kernel runs, swap them
      (in ``triton.language``, its ``standard``/``random`` modules and tensor methods) for interpreted
      twins.
    * The interpreter holds scalars as shape-(1,) arrays and converts them with ``int()``, which
      NumPy >= 2.3 rejects, so loops bounded by loaded values fail; re-register ``__index__``.
    * Its ``tl.dot`` multiplies bf16 operands as their raw uint16 bit patterns; widen them to fp32.
    * Its float -> fp8 conversion loses the carry of a rounded-up mantissa, and its fp32 -> bf16 cast
      truncates; convert both through torch (round to nearest even, like the GPU).

    Both go through the interpreter's own patch scope. Interpreted and compiled launches are not meant
    to be mixed in one process (the tests use one or the other).
    """
    global _INTERPRETER_READY
    if _INTERPRETER_READY:
        return
    import numpy as np
    import triton.language.random as tl_random
    import triton.language.standard as tl_standard
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    twins: dict[int, Any] = {}
    owners = (tl, tl_standard, tl_random, tl.tensor)

    class Twin(interp.InterpretedFunction):
        """A device function called from an interpreted kernel. Triton's own call patches ``triton.language``
        for the interpreter and never restores it, which breaks every later compile in the process (the
        sm_90 compile tests); this one restores its patches on return."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            scope = interp._patch_lang(self.fn)
            try:
                return self.rewrite()(*args, **kwargs)
            except Exception as e:
                raise interp.InterpreterError(repr(e)) from e
            finally:
                scope.restore()

    def twin(fn: Any) -> Any:
        if id(fn) not in twins:
            twins[id(fn)] = Twin(fn.fn)
        return twins[id(fn)]

    original_core = interp._patch_lang_core
    original_tensor = interp._patch_lang_tensor

    def patched_core(lang: Any, scope: Any) -> None:
        original_core(lang, scope)
        for owner in owners:
            for name, value in list(vars(owner).items()):
                if isinstance(value, JITFunction):
                    scope.set_attr(owner, name, twin(value))

    def patched_tensor(tensor: Any, scope: Any) -> None:
        original_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    original_dot = interp.InterpreterBuilder.create_dot

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        def widen(x: Any) -> Any:
            if x.dtype != tl.bfloat16:
                return x
            bits = x.data.astype(np.uint32) << np.uint32(16)
            return interp.TensorHandle(bits.view(np.float32), tl.float32)

        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot

    # Its float -> fp8 rounding drops the carry when the mantissa rounds up (124.3 -> 64, not 128): convert
    # fp8 through torch, which rounds to nearest even and saturates like the GPU's cvt.rn.satfinite.
    fp8_torch = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
    original_fp_to_fp = interp.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty.name in fp8_torch and src_ty.name in ("fp32", "fp16", "bf16"):
            values = torch.from_numpy(np.ascontiguousarray(src.data))
            if src_ty.name == "bf16":
                values = (values.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
            limit = torch.finfo(fp8_torch[dst_ty.name]).max
            out = values.float().clamp(-limit, limit).to(fp8_torch[dst_ty.name]).view(torch.uint8).numpy()
            return interp.TensorHandle(out, dst_ty)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    interp.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp

    # Its fp32 -> bf16 cast (``.to(tl.bfloat16)``) truncates the mantissa; the GPU rounds to nearest even.
    original_cast = interp.InterpreterBuilder.cast_impl

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interp.TensorHandle(values.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl
    interp._patch_lang_core = patched_core
    interp._patch_lang_tensor = patched_tensor
    _INTERPRETER_READY = True
