"""Event-loop lag as a figure: how late a task that only sleeps wakes up.

A task sleeps until a deadline ``interval`` ahead, over and over, and records how far past
the deadline it woke. That lateness is what every other task waiting for a turn of the
loop (a ``/health`` probe, a stream's next write) waited too: the time the loop spent on
other tasks' steps, on GIL hand-overs from worker threads and on garbage collection.
Times come from trio's clock, so tests drive them with ``trio.testing.MockClock``.

Each wake-up is also stamped with ``time.monotonic()``: ``stalled_for()`` is how long the
loop has not turned, readable from any thread (the ``ProbeLane``'s ``/health`` answers
503 past ``--health-loop-stall``; ``server.probes``).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass

import trio

# One sample every 10 ms: 100 wake-ups a second (a few µs of loop time each).
INTERVAL_S = 0.010
# p50/p99/max are over the last 1000 samples (about 10 s at the default interval).
WINDOW_SAMPLES = 1000
# Upper bounds (seconds) of the cumulative histogram kept since start (Prometheus style;
# fine below 30 ms, where bench/README.md's targets are).
BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.010, 0.015, 0.020, 0.030, 0.050,
    0.075, 0.100, 0.250, 0.500, 1.0, 2.5,
)  # fmt: skip


@dataclass(frozen=True)
class LoopLagStatistics:
    """``samples`` and ``total_s`` since start; ``p50_s``, ``p99_s`` and ``max_s`` over the
    last ``window`` samples (0 when there are none); ``buckets``: (upper bound, samples at
    or below it) since start, cumulative, the last bound ``inf``."""

    samples: int
    total_s: float
    window: int
    p50_s: float
    p99_s: float
    max_s: float
    buckets: tuple[tuple[float, int], ...]


def nearest_rank(ordered: list[float], quantile: float) -> float:
    """The ``quantile`` of ``ordered`` (ascending) by the nearest-rank rule; 0 if empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(quantile * len(ordered)))
    return ordered[rank - 1]


class LoopLagMonitor:
    """Measures the event loop's lag while ``run()`` runs; ``statistics()`` any time."""

    def __init__(
        self,
        interval: float = INTERVAL_S,
        window: int = WINDOW_SAMPLES,
        buckets: tuple[float, ...] = BUCKETS_S,
    ) -> None:
        self.interval = interval
        self._recent: deque[float] = deque(maxlen=window)
        self._bounds = (*buckets, math.inf)
        self._counts = [0] * len(self._bounds)
        self._samples = 0
        self._total = 0.0
        self._last_wake: float | None = None  # time.monotonic() of the last wake-up while running

    def record(self, lateness: float) -> None:
        """Count one wake-up ``lateness`` seconds after its deadline."""
        lateness = max(0.0, lateness)
        self._recent.append(lateness)
        self._counts[bisect.bisect_left(self._bounds, lateness)] += 1
        self._samples += 1
        self._total += lateness

    async def run(self) -> None:
        """Sleep ``interval`` at a time forever, recording each wake-up's lateness.

        Cancellation: returns nothing, leaves nothing behind; the figures stay readable
        and ``stalled_for()`` reads 0 again.
        """
        try:
            while True:
                self._last_wake = time.monotonic()
                deadline = trio.current_time() + self.interval
                await trio.sleep_until(deadline)
                self.record(trio.current_time() - deadline)
        finally:
            self._last_wake = None

    def stalled_for(self) -> float:
        """Seconds the loop is overdue for this monitor's next wake-up (0 when on time or
        while ``run()`` is not running). Thread-safe: one attribute read."""
        last = self._last_wake
        if last is None:
            return 0.0
        return max(0.0, time.monotonic() - last - self.interval)

    def statistics(self) -> LoopLagStatistics:
        ordered = sorted(self._recent)
        cumulative, running = [], 0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return LoopLagStatistics(
            samples=self._samples,
            total_s=self._total,
            window=len(ordered),
            p50_s=nearest_rank(ordered, 0.50),
            p99_s=nearest_rank(ordered, 0.99),
            max_s=ordered[-1] if ordered else 0.0,
            buckets=tuple(cumulative),
        )
