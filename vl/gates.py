"""The CPU gates of request preparation, and the statistics every gate reports.

Each gate is a ``trio.CapacityLimiter`` that is held *by the worker doing the work* (a
thread here; ``run_in_process`` gives the same guarantee for a worker process):
``trio.to_thread.run_sync(fn, limiter=gate)`` borrows a token before the thread starts
and, with the default ``abandon_on_cancel=False``, gives it back only when the thread has
returned, even if the caller was cancelled meanwhile. So a gate's borrowed tokens always
equal the threads running under it, and cancelled waiters never start work (no backlog).

A caller that wants to know how long a call waited for its token and how long it held it
passes a ``BorrowTimes`` (``Gate.run(..., times=t)``): the gate fills it in as the token is
taken and given back, in trio's clock (so ``trio.testing.MockClock`` drives it), at no cost
to the call itself (two clock reads on the event loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

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


class BorrowTimes:
    """When one call asked for a gate's token, got it, and gave it back
    (``trio.current_time()`` readings; ``None`` until that happened)."""

    __slots__ = ("acquired", "asked", "released")

    def __init__(self) -> None:
        self.asked: float | None = None
        self.acquired: float | None = None
        self.released: float | None = None

    @property
    def waited(self) -> float | None:
        """Seconds between asking for the token and getting it."""
        return None if self.acquired is None or self.asked is None else self.acquired - self.asked

    @property
    def held(self) -> float | None:
        """Seconds the token was held: the work, plus handing it to and from the worker."""
        return None if self.released is None or self.acquired is None else self.released - self.acquired


class TimedBorrow:
    """A ``CapacityLimiter`` seen through a timer: borrows from ``limiter``, notes one
    call's times in ``times`` (if given: a ``TimedBorrow`` per call) and reports every
    acquisition's wait to ``on_wait(seconds)`` (if given: one may serve many calls). It
    offers what ``trio.to_thread.run_sync`` (``acquire_on_behalf_of``,
    ``release_on_behalf_of``) and trio-parallel and ``async with`` use of a limiter; the
    tokens, their count and their order stay ``limiter``'s."""

    def __init__(
        self,
        limiter: trio.CapacityLimiter,
        times: BorrowTimes | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._limiter = limiter
        self._times = times
        self._on_wait = on_wait

    async def acquire_on_behalf_of(self, borrower: Any) -> None:
        asked = trio.current_time()
        if self._times is not None:
            self._times.asked = asked
        await self._limiter.acquire_on_behalf_of(borrower)
        acquired = trio.current_time()
        if self._times is not None:
            self._times.acquired = acquired
        if self._on_wait is not None:
            self._on_wait(acquired - asked)

    def release_on_behalf_of(self, borrower: Any) -> None:
        self._limiter.release_on_behalf_of(borrower)
        if self._times is not None:
            self._times.released = trio.current_time()

    async def __aenter__(self) -> None:
        await self.acquire_on_behalf_of(trio.lowlevel.current_task())

    async def __aexit__(self, *exc_info: object) -> None:
        self.release_on_behalf_of(trio.lowlevel.current_task())


class Gate:
    """A named limiter plus a count of the work it has completed."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"gate {name!r} needs a capacity of at least 1")
        self.name = name
        self.limiter = trio.CapacityLimiter(capacity)
        self._completed = 0

    def _limiter_for(self, times: BorrowTimes | None) -> Any:
        return self.limiter if times is None else TimedBorrow(self.limiter, times)

    async def run(self, fn: Callable[..., T], *args, times: BorrowTimes | None = None) -> T:
        """Run ``fn(*args)`` in a worker thread holding one token of this gate; ``times``
        (if given) is filled in as the token is taken and given back.

        Cancellation: while waiting for a token, the call is cancelled at once and ``fn``
        never starts. Once ``fn`` runs, cancellation is deferred: the call waits for the
        thread to return (the thread keeps the token until then) and returns its result;
        ``Cancelled`` is raised at the caller's next checkpoint.
        """
        result = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter_for(times))
        self._completed += 1
        return result

    async def run_in_process(
        self, context: trio_parallel.WorkerContext, fn: Callable[..., T], *args, times: BorrowTimes | None = None
    ) -> T:
        """Run ``fn(*args)`` in a worker process of ``context`` holding one token of this
        gate; ``times``: as ``run``.

        ``fn`` and ``args`` must pickle. Cancellation: as ``run``: while waiting for a token
        the call is cancelled at once; once the job is sent, the caller waits (shielded)
        for the process to return and keeps the token until then.
        """
        result = await context.run_sync(fn, *args, limiter=self._limiter_for(times))
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
