"""``Histogram``: a cumulative histogram over fixed bounds, the shape Prometheus exposes.

Plain counters, no lock and no torch: whoever owns one feeds it from one thread (the event
loop's, for every histogram of the server) and ``server.metrics`` reads it when scraped.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

# vLLM's bounds for its request-latency families (e2e latency, queue time), in seconds
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class Histogram:
    """A cumulative histogram over fixed upper bounds (the last one ``inf``)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = (*bounds, math.inf)
        self._counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Count ``value`` ``count`` times."""
        self._counts[bisect.bisect_left(self.bounds, value)] += count
        self.total += value * count

    def buckets(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), cumulative."""
        out, running = [], 0
        for bound, count in zip(self.bounds, self._counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    @property
    def count(self) -> int:
        return sum(self._counts)
