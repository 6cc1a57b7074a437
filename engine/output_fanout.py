"""Each step's outputs handed to their streams a few per event-loop pass. No torch import.

A step's ``StepOutputs`` carries an update for every running sequence. Pushing them all at
once makes every stream's consumer runnable in the same scheduler pass, and the pass after
it holds every one of their socket writes: at 128 streams a pass of 15-25 ms on these
CPUs, and anything that arrives meanwhile (``/health``) waits for it. ``OutputFanout``
pushes at most ``per_pass`` updates per pass and the rest in the passes after, so a pass
holds a bounded amount of stream work and a probe waits behind that, not behind the whole
batch. Total work is unchanged; the last stream of a step gets its delta a few passes
later (docs/architecture.md, "The path of a probe").
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import trio

from engine.core_messages import SequenceOutput
from engine.stream_registry import StreamRegistry


class OutputFanout:
    """Pushes ``SequenceOutput``s to the streams of ``streams``, in arrival order, at most
    ``per_pass`` per scheduler pass. Event loop only.

    Updates of one sequence keep their order (one FIFO). An update whose stream has been
    closed (its consumer left) is dropped, as ``AsyncEngine`` always did.
    """

    def __init__(self, streams: StreamRegistry, per_pass: int) -> None:
        if per_pass < 1:
            raise ValueError(f"per_pass must be >= 1, got {per_pass!r}")
        self._streams = streams
        self._per_pass = per_pass
        self._backlog: collections.deque[SequenceOutput] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()

    def deliver(self, updates: Iterable[SequenceOutput]) -> None:
        """Queue ``updates``; with no backlog, the first ``per_pass`` are pushed now and the
        rest are left to ``run``. Never blocks."""
        idle = not self._backlog
        self._backlog.extend(updates)
        if idle:
            self._push(self._per_pass)
        if self._backlog:
            self._lot.unpark_all()

    async def run(self) -> None:
        """Push the backlog ``per_pass`` updates per scheduler pass, forever.

        Cancellation: whatever is still queued stays queued; ``flush`` pushes it.
        """
        while True:
            while not self._backlog:
                await self._lot.park()
            # woken in ``deliver``'s pass, this runs in the next: one part per pass from here
            self._push(self._per_pass)
            await trio.lowlevel.checkpoint()

    def flush(self) -> None:
        """Push everything queued now (the step loop is gone, or the engine is closing:
        finished sequences must end with their own finish reason, not an abort)."""
        self._push(len(self._backlog))

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def _push(self, count: int) -> None:
        backlog = self._backlog
        for _ in range(min(count, len(backlog))):
            update = backlog.popleft()
            stream = self._streams.get(update.seq_id)
            if stream is not None:  # else its consumer has left; the abort is on its way
                stream.push(update)
