"""A pool of shared-memory pixel slots: image pixels cross process boundaries by index.

Prep (a worker thread or a prep worker process) writes one image's preprocessed pixels
into a slot of one shared-memory segment and hands on a small ``SlotPixels`` descriptor;
the reader (the engine's vision encoder, in its worker process or a thread) reads them in
place until the image is encoded. Nothing large
travels through a pipe or gets unpickled on an event loop (docs/architecture.md, "Pixel
slots").

- ``SlotPool`` lives in the front-end (trio) process. ``SlotPool.create`` makes the one
  segment of ``count * slot_bytes`` at start-up (after checking that ``shm_dir`` has room
  for it) and always closes and unlinks it when the block exits.
- A slot is a gated resource: ``SlotPool.acquire_many(n)`` waits until it can hand out
  ``n`` slots at once and returns ``Slot`` handles whose ``release`` hands each back. A
  request takes all its images' slots in one call: if requests took them one by one,
  several could each hold a few and wait for the rest forever. The holder releases it on every path
  (``try``/``finally``), once the reader no longer needs the pixels.
- ``SlotMemory`` is one process's mapping of the segment (``SlotMemory.attach(spec)``):
  ``write`` copies an array or tensor into a slot (``array_view`` lets a producer write
  in place), ``view`` reads it in place as a tensor, ``read`` copies it out again.

Which process may write or read a slot is decided by whoever holds its ``Slot``; the
memory itself has no locks. This module imports no torch at import time (``SlotSpec`` and
``SlotPixels`` travel in light engine messages, and a prep process writes NumPy arrays
without it); the tensor methods load it.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING

import numpy as np
import trio

if TYPE_CHECKING:
    import torch

MIB = 1024 * 1024
_SLOT_FLAGS = "--pixel-slots, --pixel-slot-mb"


class SlotPoolError(RuntimeError):
    """The pool cannot be made (e.g. ``/dev/shm`` has too little free space)."""


class SlotTooSmall(ValueError):
    """A tensor larger than one slot."""


@dataclass(frozen=True)
class SlotSpec:
    """What another process needs to attach to a pool's segment. Picklable and hashable."""

    name: str  # the SharedMemory segment's name
    count: int
    slot_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.count * self.slot_bytes


@dataclass(frozen=True)
class SlotPixels:
    """A tensor written into slot ``index``: enough to read it back. Picklable and small."""

    index: int
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


@dataclass(frozen=True)
class SlotPoolStatistics:
    total: int  # slots in the pool
    free: int  # slots an ``acquire`` could take now without waiting
    waiting: int  # tasks waiting in ``acquire``
    acquired: int  # acquisitions since the pool was made


def check_shm_space(needed: int, available: int, shm_dir: str = "/dev/shm") -> None:
    """Raise ``SlotPoolError`` unless ``available`` bytes hold a segment of ``needed`` bytes.

    The message says both figures and which flags lower the need: a segment larger than
    its filesystem's free space would be created (tmpfs allocates pages lazily) and the
    first write past the free space would kill the writer with SIGBUS."""
    if needed > available:
        raise SlotPoolError(
            f"the pixel slot pool needs {needed} bytes ({needed / MIB:.1f} MiB) of shared memory "
            f"but {shm_dir} has {available} bytes ({available / MIB:.1f} MiB) free; lower {_SLOT_FLAGS} "
            f"(the pool holds --pixel-slots x --pixel-slot-mb) or give {shm_dir} more room "
            "(docker: --shm-size)"
        )


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged process may still allocate on ``directory``'s filesystem."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


class Slot:
    """The front end's handle on one acquired slot of a ``SlotPool``.

    ``release`` is synchronous and idempotent: the first call hands the slot back to its
    pool (waking the longest waiter, if any), later calls do nothing. Call it from the trio
    thread that runs the pool (a ``finally`` block, a delivery callback), and only once the
    slot's pixels will never be read again."""

    __slots__ = ("_pool", "index", "released")

    def __init__(self, pool: SlotPool, index: int) -> None:
        self._pool = pool
        self.index = index
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._pool._give_back(self.index)

    def __repr__(self) -> str:
        return f"Slot(index={self.index}, released={self.released})"


class SlotPool:
    """``count`` slots of ``slot_bytes`` each in one shared-memory segment, handed out by index.

    Made with ``SlotPool.create``. Waiting is a ``trio.Semaphore`` over a free list behind
    a turnstile: callers take turns (``trio.Lock`` is FIFO), and only the caller whose turn
    it is takes units from the semaphore, one by one until it has all it asked for, so no
    two callers ever hold part of what they need while waiting for more (a slot comes back
    once its request has submitted the image and the engine has encoded it, neither of
    which waits for another slot, so the one at the turnstile always gets its slots). Unlike a ``CapacityLimiter`` a unit is not tied to the
    task that took it, so a slot acquired by a request task may be released by whichever
    task or callback sees the pixels consumed. Freed indexes are reused last-in first-out
    (the warmest pages first)."""

    def __init__(self, spec: SlotSpec, memory: SlotMemory) -> None:
        self.spec = spec
        self.memory = memory  # this process's view: thread prep and an in-thread engine use it
        self._free = list(range(spec.count - 1, -1, -1))  # pop() takes index 0 first
        self._available = trio.Semaphore(spec.count)
        self._turnstile = trio.Lock()
        self._acquired = 0

    @classmethod
    @contextmanager
    def create(cls, count: int, slot_bytes: int, *, shm_dir: str = "/dev/shm") -> Iterator[SlotPool]:
        """Make the segment and run the pool until the block exits.

        Before creating, checks that ``shm_dir`` has ``count * slot_bytes`` free
        (``SlotPoolError`` otherwise, naming the flags that lower it). On exit, normal or by
        an exception, this process's views are closed and the segment is unlinked; a process
        still mapping it keeps its pages until it unmaps them. If this process dies without
        exiting the block, its multiprocessing resource tracker unlinks the segment."""
        if count < 1 or slot_bytes < 1:
            raise ValueError(f"a slot pool needs count >= 1 and slot_bytes >= 1, got {count} and {slot_bytes}")
        check_shm_space(count * slot_bytes, free_bytes(shm_dir), shm_dir)
        try:
            segment = SharedMemory(create=True, size=count * slot_bytes)
        except OSError as exc:
            raise SlotPoolError(f"could not create the pixel slot segment ({exc}); lower {_SLOT_FLAGS}") from exc
        try:
            memory = SlotMemory.attach(SlotSpec(segment.name, count, slot_bytes))
            try:
                yield cls(memory.spec, memory)
            finally:
                memory.close()
        finally:
            segment.close()
            segment.unlink()

    async def acquire(self) -> Slot:
        """One slot: ``acquire_many(1)``."""
        [slot] = await self.acquire_many(1)
        return slot

    async def acquire_many(self, n: int) -> list[Slot]:
        """Take ``n`` free slots at once, waiting (first come, first served) until this
        caller has them all. Raises ``ValueError`` unless ``1 <= n <= count`` (more could
        never be free at once).

        Cancellation: a call cancelled while waiting takes no slot (those it had collected
        go back to the pool); once it returns, the caller holds every slot and must release
        each."""
        if not 1 <= n <= self.spec.count:
            raise ValueError(f"cannot take {n} slots at once from a pool of {self.spec.count}")
        slots: list[Slot] = []
        async with self._turnstile:
            try:
                for _ in range(n):
                    await self._available.acquire()
                    # No checkpoint between the semaphore and the pop: a granted unit is a slot.
                    slots.append(Slot(self, self._free.pop()))
                    self._acquired += 1
            except BaseException:
                for slot in slots:
                    slot.release()
                raise
        return slots

    def statistics(self) -> SlotPoolStatistics:
        """``waiting``: callers waiting for slots (at the turnstile, or collecting theirs)."""
        return SlotPoolStatistics(
            total=self.spec.count,
            free=self._available.value,
            waiting=self._turnstile.statistics().tasks_waiting + self._available.statistics().tasks_waiting,
            acquired=self._acquired,
        )

    def _give_back(self, index: int) -> None:
        self._free.append(index)
        self._available.release()


class SlotMemory:
    """One process's mapping of a pool's segment: arrays and tensors into slots, views of
    them, copies out of them.

    ``write`` and ``read`` keep no view of the mapping past their return. ``close`` must
    wait until no ``write``/``read`` runs and no view is alive: ``tensor_view`` and ``view``
    give ``torch.frombuffer`` tensors, which hold no buffer export, so the mapping would not
    refuse to close under them (``array_view``'s arrays do: ``close`` raises then); the
    runtime closes the pool last, when nothing uses it.
    Different slots may be written and read from different threads at once; one slot is
    used by whoever holds its ``Slot``."""

    def __init__(self, spec: SlotSpec, mapping: mmap.mmap) -> None:
        self.spec = spec
        self._mapping: mmap.mmap | None = mapping

    @classmethod
    def attach(cls, spec: SlotSpec) -> SlotMemory:
        """Map ``spec``'s segment in this process, without telling any resource tracker.

        Python 3.11's ``SharedMemory(name)`` registers the segment with the calling
        process's resource tracker, which unlinks it when that process exits, under the
        creator's feet. The usual cure (unregister after attaching) is wrong for processes
        started by multiprocessing's spawn or forkserver (prep workers, via trio-parallel):
        they share their parent's tracker, whose record is a set, so the child's unregister
        erases the creator's own registration: a creator that then dies leaks the segment,
        and one that unlinks makes the tracker print a ``KeyError``. So the segment is
        opened as ``SharedMemory`` does it (``shm_open`` + ``mmap``) minus the registration,
        on every Python version (3.13's ``SharedMemory(track=False)`` would do the same).
        Only the creator (``SlotPool.create``) registers, and it alone unlinks."""
        return cls(spec, _map_untracked(spec.name))

    def write(self, index: int, values: np.ndarray | torch.Tensor) -> SlotPixels:
        """Copy ``values`` (a NumPy array or a torch tensor, made contiguous if it is not)
        into slot ``index``; values already written in place (``array_view``,
        ``tensor_view``) are not copied. A NumPy array is written without importing torch.

        Raises ``SlotTooSmall`` for values larger than a slot and ``IndexError`` for an
        index outside the pool. The caller must hold the slot."""
        if isinstance(values, np.ndarray):
            return self._write_array(index, values)
        import torch

        tensor = values.detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self._check_fits(nbytes, tuple(tensor.shape), _dtype_name(tensor.dtype))
        offset = self._offset(index)
        if nbytes:
            target = torch.frombuffer(self._open_mapping(), dtype=torch.uint8, count=nbytes, offset=offset)
            try:
                if target.data_ptr() != tensor.data_ptr():  # else written in place (``tensor_view``)
                    target.copy_(tensor.cpu().reshape(-1).view(torch.uint8))
            finally:
                del target  # no view of the mapping outlives the call (see ``tensor_view``)
        return SlotPixels(index=index, shape=tuple(tensor.shape), dtype=_dtype_name(tensor.dtype))

    def _write_array(self, index: int, values: np.ndarray) -> SlotPixels:
        values = np.ascontiguousarray(values)
        dtype = values.dtype.name
        self._check_fits(values.nbytes, values.shape, dtype)
        offset = self._offset(index)
        if values.nbytes:
            target = np.frombuffer(self._open_mapping(), dtype=np.uint8, count=values.nbytes, offset=offset)
            try:
                if target.ctypes.data != values.ctypes.data:  # else written in place (``array_view``)
                    np.copyto(target, values.reshape(-1).view(np.uint8))
            finally:
                del target  # releases the mapping's buffer export (see ``array_view``)
        return SlotPixels(index=index, shape=tuple(values.shape), dtype=dtype)

    def array_view(self, index: int, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
        """A writable, contiguous NumPy array of ``shape`` and ``dtype`` (a NumPy dtype
        name) over the start of slot ``index``, for a producer to write its values in
        place (the image fast path, ``vl.qwen2_vl_pixels``); ``write(index, view)`` then
        copies nothing and gives the descriptor.

        Raises ``SlotTooSmall`` if it does not fit a slot, ``IndexError`` for an index
        outside the pool. The caller must hold the slot. The array holds a buffer export
        of the mapping, so ``close`` raises ``BufferError`` while one is alive rather than
        leave it pointing at unmapped memory."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        self._check_fits(nbytes, shape, dtype)
        offset = self._offset(index)
        if not nbytes:
            return np.empty(shape, dtype=dtype)
        raw = np.frombuffer(self._open_mapping(), dtype=np.uint8, count=nbytes, offset=offset)
        return raw.view(dtype).reshape(shape)

    def _check_fits(self, nbytes: int, shape: tuple[int, ...], dtype: str) -> None:
        if nbytes > self.spec.slot_bytes:
            raise SlotTooSmall(
                f"pixels of {nbytes} bytes do not fit a slot of {self.spec.slot_bytes} bytes "
                f"(shape {tuple(shape)}, {dtype}); raise --pixel-slot-mb"
            )

    def tensor_view(self, index: int, shape: tuple[int, ...], dtype: str = "float32") -> torch.Tensor:
        """A writable, contiguous tensor of ``shape`` and ``dtype`` over the start of slot
        ``index``, for a producer to write its values in place; ``write(index, view)`` then
        copies nothing and gives the descriptor.

        Raises ``SlotTooSmall`` if it does not fit a slot, ``IndexError`` for an index
        outside the pool. The caller must hold the slot, and must drop the view (and every
        tensor or array over it) before this mapping is closed: ``torch.frombuffer`` holds
        no buffer export, so ``close`` would not refuse, and the view would point at
        unmapped memory."""
        import torch

        nbytes = math.prod(shape) * _itemsize(dtype)
        self._check_fits(nbytes, shape, dtype)
        offset = self._offset(index)
        if not nbytes:
            return torch.empty(shape, dtype=getattr(torch, dtype))
        raw = torch.frombuffer(self._open_mapping(), dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.view(getattr(torch, dtype)).reshape(shape)

    def view(self, pixels: SlotPixels) -> torch.Tensor:
        """The tensor ``pixels`` describes, over its slot's memory (no copy): what the
        engine's vision encoder reads. Valid only while the slot is held (the engine's hold
        ends once the image is encoded, ``engine.slot_lease``) and the mapping is open; the
        same rules as ``tensor_view``. Raises ``SlotTooSmall`` or ``IndexError`` as it does."""
        return self.tensor_view(pixels.index, pixels.shape, pixels.dtype)

    def read(self, pixels: SlotPixels) -> torch.Tensor:
        """A private copy of the tensor ``pixels`` describes (safe after the slot is reused)."""
        import torch

        offset = self._offset(pixels.index)
        nbytes = pixels.nbytes
        if nbytes > self.spec.slot_bytes:
            raise SlotTooSmall(f"{pixels} is larger than a slot of {self.spec.slot_bytes} bytes")
        dtype = getattr(torch, pixels.dtype)
        if not nbytes:
            return torch.empty(pixels.shape, dtype=dtype)
        source = torch.frombuffer(self._open_mapping(), dtype=torch.uint8, count=nbytes, offset=offset)
        try:
            copy = source.clone()
        finally:
            del source
        return copy.view(dtype).reshape(pixels.shape)

    def close(self) -> None:
        """Unmap the segment (idempotent). Only once nothing uses it (see the class docstring)."""
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def _open_mapping(self) -> mmap.mmap:
        if self._mapping is None:
            raise ValueError("SlotMemory is closed")
        return self._mapping

    def _offset(self, index: int) -> int:
        if not 0 <= index < self.spec.count:
            raise IndexError(f"slot {index} outside a pool of {self.spec.count}")
        return index * self.spec.slot_bytes


def _map_untracked(name: str) -> mmap.mmap:
    """A read-write mapping of the existing POSIX shared-memory segment ``name``: the calls
    ``SharedMemory(name)`` makes, minus the resource-tracker registration (what 3.13's
    ``track=False`` leaves out too; see ``SlotMemory.attach``)."""
    import _posixshmem  # multiprocessing.shared_memory's own POSIX binding

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype: str) -> int:
    size = _ITEMSIZES.get(dtype)
    if size is None:  # a rarer dtype: ask torch
        import torch

        size = getattr(torch, dtype).itemsize
    return size


# Sizes of the usual dtypes, so that light modules can size a descriptor without torch.
_ITEMSIZES = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
}  # fmt: skip
