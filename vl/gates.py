"""The CPU gates of request preparation, and the statistics every gate reports.

Each gate is a ``trio.CapacityLimiter`` that is held *by the worker doing the work* (a
thread here; ``run_in_process`` gives the same guarantee for a worker process):
``trio.to_thread.run_sync(fn, limiter=gate)`` borrows a token before the thread starts
and, with the default ``abandon_on_cancel=False``, gives it back only when the thread has
returned, even if the caller was cancelled meanwhile. So a gate's borrowed tokens always
equal the threads running under it, and cancelled waiters never start work (no backlog).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import trio_parallel

T = TypeVar("T")


@dataclass(frozen=True)
class GateStatistics:
    name: str
    borrowed: int
    total: int
    waiting: int
    completed: int


class Gate:
    """A named limiter plus a count of the work it has completed."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"gate {name!r} needs a capacity of at least 1")
        self.name = name
        self.limiter = trio.CapacityLimiter(capacity)
        self._completed = 0

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` in a worker thread holding one token of this gate.

        Cancellation: while waiting for a token, the call is cancelled at once and ``fn``
        never starts. Once ``fn`` runs, cancellation is deferred: the call waits for the
        thread to return (the thread keeps the token until then) and returns its result;
        ``Cancelled`` is raised at the caller's next checkpoint.
        """
        result = await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        self._completed += 1
        return result

    async def run_in_process(self, context: trio_parallel.WorkerContext, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` in a worker process of ``context`` holding one token of this gate.

        ``fn`` and ``args`` must pickle. Cancellation: as ``run``: while waiting for a token
        the call is cancelled at once; once the job is sent, the caller waits (shielded)
        for the process to return and keeps the token until then.
        """
        result = await context.run_sync(fn, *args, limiter=self.limiter)
        self._completed += 1
        return result

    def statistics(self) -> GateStatistics:
        stats = self.limiter.statistics()
        return GateStatistics(
            name=self.name,
            borrowed=stats.borrowed_tokens,
            total=int(stats.total_tokens),
            waiting=stats.tasks_waiting,
            completed=self._completed,
        )
