"""Checkpoint tensors that are read only where a rank needs them.

A ``LazyTensor`` knows its shape and dtype but holds no data. ``narrow``, ``split``,
``chunk`` and basic slicing (``t[a:b]``, ``t[:, a:b]``) compose index ranges without reading
anything; the first real use (``param.copy_(t)``, any torch function, any other attribute)
reads just the selected block from its source (a safetensors slice, a GGUF tensor). So the
weight loaders of the tensor-parallel layers, which only ``narrow`` and copy, make each rank
read only its own shard, and the tensors of other pipeline stages are never read at all.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Ranges = tuple[tuple[int, int], ...]


class LazyTensor:
    """A block ``ranges`` (per-dimension ``[start, stop)``) of a tensor that ``read`` produces.

    ``read(slices)`` gets one ``slice`` per dimension and returns that block as a tensor.
    """

    def __init__(self, read: Callable[[tuple[slice, ...]], torch.Tensor], shape: Sequence[int],
                 dtype: torch.dtype, ranges: Ranges | None = None, dropped: frozenset[int] = frozenset()) -> None:
        self._read = read
        self._full_shape = tuple(int(n) for n in shape)
        self._ranges: Ranges = ranges if ranges is not None else tuple((0, n) for n in self._full_shape)
        self._dropped = dropped   # source dimensions indexed by an integer (gone from the shape)
        self._dims = tuple(d for d in range(len(self._full_shape)) if d not in dropped)
        self.dtype = dtype

    # ------------------------------------------------------------------ metadata (no reading)
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._ranges[d][1] - self._ranges[d][0] for d in self._dims)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self._dims)

    @property
    def ndim(self) -> int:
        return len(self._dims)

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype})"

    # ------------------------------------------------------------------ views (no reading)
    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        return self._restrict(dim, start, length, drop=False)

    def select(self, dim: int, index: int) -> LazyTensor:
        n = self.shape[dim]
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for dimension {dim} of size {n}")
        return self._restrict(dim, index % n, 1, drop=True)

    def _restrict(self, dim: int, start: int, length: int, drop: bool) -> LazyTensor:
        full = self._dims[dim % self.dim()]
        begin, stop = self._ranges[full]
        if start < 0 or length < 0 or begin + start + length > stop:
            raise IndexError(f"narrow({dim}, {start}, {length}) is outside a tensor of shape {tuple(self.shape)}")
        ranges = list(self._ranges)
        ranges[full] = (begin + start, begin + start + length)
        dropped = self._dropped | {full} if drop else self._dropped
        return LazyTensor(self._read, self._full_shape, self.dtype, tuple(ranges), dropped)

    def split(self, split_size: int | Sequence[int], dim: int = 0) -> tuple[LazyTensor, ...]:
        n = self.shape[dim]
        sizes = [split_size] * (-(-n // split_size)) if isinstance(split_size, int) else list(split_size)
        if isinstance(split_size, int):
            sizes[-1] = n - split_size * (len(sizes) - 1)
        if sum(sizes) != n:
            raise ValueError(f"split sizes {sizes} do not add up to {n}")
        out, offset = [], 0
        for size in sizes:
            out.append(self.narrow(dim, offset, size))
            offset += size
        return tuple(out)

    def chunk(self, chunks: int, dim: int = 0) -> tuple[LazyTensor, ...]:
        return self.split(-(-self.shape[dim] // chunks), dim)

    def __getitem__(self, index: Any) -> LazyTensor | torch.Tensor:
        """Integers and slices with step 1 (``t[e]``, ``t[a:b]``, ``t[:, a:b]``) stay lazy;
        any other index reads the block and applies it."""
        items = index if isinstance(index, tuple) else (index,)
        simple = all(isinstance(i, int) or (isinstance(i, slice) and i.step in (None, 1)) for i in items)
        if len(items) > self.dim() or not simple:
            return self.materialize()[index]
        out, dim = self, 0
        for item in items:
            if isinstance(item, int):
                out = out.select(dim, item)   # the dimension goes away: the next item is the same dim
                continue
            start, stop, _ = item.indices(out.shape[dim])
            out = out.narrow(dim, start, max(stop - start, 0))
            dim += 1
        return out

    # ------------------------------------------------------------------ reading
    def materialize(self) -> torch.Tensor:
        """Read the selected block (only it) into a new CPU tensor."""
        block = self._read(tuple(slice(start, stop) for start, stop in self._ranges))
        return block.reshape(self.shape) if self._dropped else block

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Any torch operation reads the block first (``param.copy_(lazy)``, ``torch.cat``, ...)."""
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __getattr__(self, name: str) -> Any:
        """Tensor methods this class does not define (``.to``, ``.t``, ``.view``...) read the block."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)


def _reading_operator(name: str) -> Callable[..., Any]:
    def op(self: LazyTensor, *args: Any) -> Any:
        return getattr(self.materialize(), name)(*_materialized(args))
    op.__name__ = name
    return op


# Operators are looked up on the type, not through __getattr__: each reads the block too.
for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
              "__rtruediv__", "__matmul__", "__rmatmul__", "__neg__", "__pow__", "__eq__", "__ne__",
              "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__or__", "__rshift__", "__lshift__",
              "__array__", "__float__", "__int__", "__bool__", "__iter__"):
    setattr(LazyTensor, _name, _reading_operator(_name))
LazyTensor.__hash__ = object.__hash__  # type: ignore[method-assign]


def _materialized(obj: Any) -> Any:
    if isinstance(obj, LazyTensor):
        return obj.materialize()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialized(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialized(v) for k, v in obj.items()}
    return obj


def materialize(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    """``t`` as a real tensor (reading it if it is lazy)."""
    return t.materialize() if isinstance(t, LazyTensor) else t
