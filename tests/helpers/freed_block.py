"""What glibc does with a freed 25 MiB block (a real-size image's pixels) in the calling
process: importable by spawned processes, and runnable as ``python -m`` in a child."""

from __future__ import annotations

import ctypes

BLOCK_BYTES = 25 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def freed_block() -> tuple[int, int]:
    """Allocate and free a 25 MiB block: (MiB mmapped for it, MiB of heap growth for it
    given back to the kernel when it was freed). (0, 0): it came from the heap and its
    memory stays there for the next one; (25, 0): glibc mmapped it (and unmapped it when
    freed); (0, > 0): the heap grew for it and was trimmed again."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    before = libc.mallinfo2()
    block = libc.malloc(BLOCK_BYTES)
    during = libc.mallinfo2()
    libc.free(ctypes.c_void_p(block))
    after = libc.mallinfo2()
    return (during.hblkhd - before.hblkhd) >> 20, max(0, during.arena - after.arena) >> 20


def apply_then_free(tunables: str) -> tuple[dict[str, int], tuple[int, int]]:
    """``engine.malloc_tunables.apply_tunables(tunables, os.environ)``, then ``freed_block``."""
    import os

    from engine.malloc_tunables import apply_tunables

    return apply_tunables(tunables, os.environ), freed_block()


if __name__ == "__main__":
    print(*freed_block())
