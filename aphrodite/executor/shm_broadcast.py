"""One writer, N readers: a ring of message slots in POSIX shared memory.

The engine pickles each step once and writes the bytes once; every worker process on the
host reads (and unpickles) them straight from the shared pages. A slot carries a small
header (sequence number, payload length, "more chunks follow"); a reader waits for the
sequence number it expects, reads, then publishes how far it has read, and the writer
reuses a slot only after every reader has passed it. A message larger than a slot is split
over consecutive slots.

Waiting: a reader spins (yielding the CPU) for ``spin_s`` and then sleeps on its own
semaphore, which the writer releases after a write when the reader has flagged itself
asleep. The sleep also has a short timeout, so a wake-up lost to a race costs at most that
long, and it lets a reader notice that the engine process is gone.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

_LINE = 64                      # bytes per header (one cache line)
_SLEEP_S = 0.01                 # longest sleep between checks of a sleeping reader


@dataclass
class BroadcastHandle:
    """What a reader process needs to attach (picklable; sent to spawned workers)."""

    name: str
    num_readers: int
    num_slots: int
    slot_bytes: int
    wakeups: list[Any]          # one multiprocessing semaphore per reader


class ShmBroadcast:
    """Create as the writer (``ShmBroadcast.create``) or attach as reader ``i`` (``ShmBroadcast.attach``)."""

    def __init__(self, handle: BroadcastHandle, shm: shared_memory.SharedMemory, reader: int | None,
                 spin_s: float) -> None:
        self.handle = handle
        self._shm = shm
        self.reader = reader
        self.spin_s = spin_s
        n, slots = handle.num_readers, handle.num_slots
        buf = shm.buf
        # Per reader: [messages read (the next expected sequence - 1), asleep flag] on its own line.
        self._readers = np.ndarray((n, _LINE // 8), dtype=np.uint64, buffer=buf, offset=0)
        base = n * _LINE
        self._slot_stride = _LINE + handle.slot_bytes
        # Per slot header: [sequence number, payload bytes, more chunks follow].
        self._headers = [np.ndarray((3,), dtype=np.uint64, buffer=buf, offset=base + i * self._slot_stride)
                         for i in range(slots)]
        self._payload = [base + i * self._slot_stride + _LINE for i in range(slots)]
        self._seq = 0                    # chunks written (writer) or read (reader)
        self._buf = buf

    @classmethod
    def create(cls, num_readers: int, ctx: Any, num_slots: int = 8, slot_bytes: int = 1 << 20) -> ShmBroadcast:
        size = num_readers * _LINE + num_slots * (_LINE + slot_bytes)
        shm = shared_memory.SharedMemory(create=True, size=size)
        np.ndarray((size,), dtype=np.uint8, buffer=shm.buf)[:num_readers * _LINE + _LINE] = 0
        for i in range(num_slots):
            np.ndarray((3,), dtype=np.uint64, buffer=shm.buf,
                       offset=num_readers * _LINE + i * (_LINE + slot_bytes))[:] = 0
        handle = BroadcastHandle(shm.name, num_readers, num_slots, slot_bytes,
                                 [ctx.Semaphore(0) for _ in range(num_readers)])
        return cls(handle, shm, None, 0.0)

    @classmethod
    def attach(cls, handle: BroadcastHandle, reader: int, spin_s: float = 1e-3) -> ShmBroadcast:
        return cls(handle, _attach_untracked(handle.name), reader, spin_s)

    # ---- writer --------------------------------------------------------------
    def enqueue(self, obj: Any, alive: Callable[[], None] | None = None) -> int:
        """Pickle ``obj`` once and publish it to every reader; returns the payload size in bytes.

        ``alive`` is called while waiting for a full ring to drain; it raises to give up (a dead reader).
        """
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.write_bytes(data, alive)
        return len(data)

    def write_bytes(self, data: bytes, alive: Callable[[], None] | None = None) -> None:
        h = self.handle
        view = memoryview(data)
        start = 0
        while True:
            chunk = view[start:start + h.slot_bytes]
            start += len(chunk)
            seq = self._seq + 1
            slot = seq % h.num_slots
            self._wait_free(seq - h.num_slots, alive)
            off = self._payload[slot]
            self._buf[off:off + len(chunk)] = chunk
            header = self._headers[slot]
            header[1] = len(chunk)
            header[2] = 1 if start < len(data) else 0
            header[0] = seq               # published last: readers see the payload complete
            self._seq = seq
            for r in range(h.num_readers):
                if self._readers[r, 1]:
                    self._readers[r, 1] = 0
                    h.wakeups[r].release()
            if start >= len(data):
                return

    def _wait_free(self, need: int, alive: Callable[[], None] | None) -> None:
        """Wait until every reader has read chunk ``need`` (the previous user of the slot)."""
        if need <= 0 or int(self._readers[:, 0].min()) >= need:
            return
        delay = 1e-5
        last_check = time.monotonic()
        while int(self._readers[:, 0].min()) < need:
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
            if alive is not None and time.monotonic() - last_check > 0.05:
                alive()
                last_check = time.monotonic()

    # ---- reader --------------------------------------------------------------
    def ready(self) -> bool:
        """True when the next message's first chunk is already there."""
        seq = self._seq + 1
        return int(self._headers[seq % self.handle.num_slots][0]) == seq

    def dequeue(self, on_idle: Callable[[], None] | None = None) -> Any:
        """The next message. ``on_idle`` is called about every second while none comes (it may raise)."""
        parts: list[bytes] = []
        while True:
            seq = self._seq + 1
            header = self._headers[seq % self.handle.num_slots]
            self._wait_for(header, seq, on_idle)
            off = self._payload[seq % self.handle.num_slots]
            n, more = int(header[1]), int(header[2])
            if not more and not parts:
                obj = pickle.loads(self._buf[off:off + n])
                self._done(seq)
                return obj
            parts.append(bytes(self._buf[off:off + n]))
            self._done(seq)
            if not more:
                return pickle.loads(b"".join(parts))

    def _done(self, seq: int) -> None:
        self._seq = seq
        self._readers[self.reader, 0] = seq

    def _wait_for(self, header: np.ndarray, seq: int, on_idle: Callable[[], None] | None) -> None:
        if int(header[0]) == seq:
            return
        deadline = time.monotonic() + self.spin_s
        while time.monotonic() < deadline:
            if int(header[0]) == seq:
                return
            os.sched_yield()
        wake = self.handle.wakeups[self.reader]
        last_idle = time.monotonic()
        while int(header[0]) != seq:
            self._readers[self.reader, 1] = 1         # asleep: the writer releases our semaphore
            if int(header[0]) == seq:
                break
            wake.acquire(timeout=_SLEEP_S)
            if on_idle is not None and time.monotonic() - last_idle > 1.0:
                on_idle()
                last_idle = time.monotonic()
        self._readers[self.reader, 1] = 0

    def close(self) -> None:
        self._readers = self._headers = self._buf = None   # type: ignore[assignment]
        try:
            self._shm.close()
        except BufferError:        # a view escaped (e.g. an exception traceback): leave it to the OS
            pass
        if self.reader is None:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without registering it with the resource tracker: the creator owns
    it, and a reader's registration would unlink it when that reader exits (Python < 3.13)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register
