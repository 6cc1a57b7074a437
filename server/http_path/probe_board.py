"""The probes' facts shared with a probe-lane process: a few bytes of memory both map.

A ``ProbeLane`` in a process of its own (``server.http_path.lane_process``) cannot call
into the server to answer ``/health`` and ``/ready``; it reads what the server last
published here instead (docs/architecture.md, "The path of a probe"):

- the server writes the lifecycle's phase, whether the engine makes progress and the stall
  limit (``publish``) at every phase change and every ``interval`` from a task of its event
  loop, stamping each write with ``time.monotonic()`` (one clock for every process of the
  machine);
- the lane reads them back as ``server.probes.ProbeFacts`` (``facts``): the loop has stalled
  for as long as the last stamp is overdue by more than ``interval``, so a stuck loop still
  turns ``/health`` 503, as a probe waiting for that loop would time out.

Writes and reads are a sequence lock: the writer makes the sequence odd, writes, makes it
even; a reader retries until it read one even sequence before and after the fields. One
writer (the server's event loop) and any number of readers. The lane counts the probes it
answered in two counters of its own (it alone writes them), for ``ProbePassLog``.

The memory is a ``memfd`` (Linux): the server creates it and passes its descriptor to the
lane process, which maps it too.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

from server.lifecycle import Phase
from server.probes import ProbeFacts

_PHASES = tuple(Phase)
# sequence, phase, engine healthy, stall limit, interval, published at
_FACTS = struct.Struct("<QBB6xddd")
# probes answered by the lane: fresh connections, keep-alive ones
_COUNTS = struct.Struct("<QQ")
_COUNTS_AT = 64
_SIZE = _COUNTS_AT + _COUNTS.size
# consistent reads tried before the last consistent one stands in (``facts``)
_READ_ATTEMPTS = 8


class ProbeBoard:
    """The shared facts (module docstring): ``create`` in the server, the constructor on
    the inherited descriptor in the lane."""

    def __init__(self, fd: int) -> None:
        """Map the board in ``fd`` (which this object then owns and closes)."""
        self._fd = fd
        self._memory = mmap.mmap(fd, _SIZE)
        self._last_read = _FACTS.unpack(bytes(_FACTS.size))  # as before any publish

    @classmethod
    def create(cls) -> ProbeBoard:
        """A new board: phase ``LOADING``, not yet published (no loop stall is read from it
        before the first ``publish``)."""
        fd = os.memfd_create("vlserve-probe-board", os.MFD_CLOEXEC)
        os.ftruncate(fd, _SIZE)
        return cls(fd)

    def fileno(self) -> int:
        return self._fd

    def publish(self, facts: ProbeFacts, interval: float) -> None:
        """Write ``facts`` (their ``loop_stalled_for`` is not copied: the reader derives it
        from this write's time) with the publisher's ``interval`` in seconds. One writer."""
        memory = self._memory
        sequence = _FACTS.unpack_from(memory)[0]
        struct.pack_into("<Q", memory, 0, sequence + 1)  # odd: being written
        _FACTS.pack_into(
            memory,
            0,
            sequence + 1,
            _PHASES.index(facts.phase),
            facts.engine_healthy,
            facts.stall_limit,
            interval,
            time.monotonic(),
        )
        struct.pack_into("<Q", memory, 0, sequence + 2)

    def facts(self) -> ProbeFacts:
        """The facts last published, with the loop's stall as of now; before any publish,
        ``LOADING`` with a healthy engine and no stall. Never spins on a write under way:
        after ``_READ_ATTEMPTS`` reads that each met one (the writer's thread preempted
        between its two stores, or the server killed there), the last consistent read
        stands in, its stall still counted from its own stamp."""
        memory = self._memory
        for _ in range(_READ_ATTEMPTS):
            read = _FACTS.unpack_from(memory)
            if read[0] % 2 == 0 and struct.unpack_from("<Q", memory)[0] == read[0]:
                self._last_read = read
                break
            os.sched_yield()
        sequence, phase, healthy, stall_limit, interval, published = self._last_read
        if sequence == 0:
            return ProbeFacts(Phase.LOADING, 0.0, 0.0, True)
        stalled = max(0.0, time.monotonic() - published - interval)
        return ProbeFacts(_PHASES[phase], stalled, stall_limit, bool(healthy))

    def count_probe(self, fresh: bool) -> None:
        """Count one probe the lane answered (the lane alone calls this)."""
        counts = list(_COUNTS.unpack_from(self._memory, _COUNTS_AT))
        counts[0 if fresh else 1] += 1
        _COUNTS.pack_into(self._memory, _COUNTS_AT, *counts)

    def probe_counts(self) -> tuple[int, int]:
        """Probes the lane answered so far: (on fresh connections, on keep-alive ones)."""
        fresh, keep_alive = _COUNTS.unpack_from(self._memory, _COUNTS_AT)
        return fresh, keep_alive

    def close(self) -> None:
        """Unmap and close the descriptor (idempotent)."""
        if not self._memory.closed:
            self._memory.close()
            os.close(self._fd)
