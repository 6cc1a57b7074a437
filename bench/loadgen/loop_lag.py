"""The server's own event-loop lag during a run, from its ``/metrics`` histogram.

vlserve's ``vlserve_event_loop_lag_seconds`` histogram counts, since start, how late a task
that only sleeps woke up (``server.loop_lag``). Scraped before and after a run, the
difference of the two is the run's own distribution; quantiles are interpolated inside
a bucket as Prometheus' ``histogram_quantile`` does. Servers without it (the baselines)
give ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILY = "vlserve_event_loop_lag_seconds"


@dataclass(frozen=True)
class LagHistogram:
    """Cumulative (upper bound in seconds, count) pairs, ending with ``inf``."""

    buckets: tuple[tuple[float, float], ...]

    def since(self, earlier: LagHistogram) -> LagHistogram:
        before = dict(earlier.buckets)
        return LagHistogram(tuple((le, count - before.get(le, 0.0)) for le, count in self.buckets))

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile in seconds (NaN without samples; the last finite bound if it
        falls in the ``+Inf`` bucket)."""
        total = self.count
        if total <= 0:
            return math.nan
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for le, count in self.buckets:
            if count >= rank:
                if math.isinf(le):
                    return lower_bound
                inside = count - lower_count
                fraction = (rank - lower_count) / inside if inside else 1.0
                return lower_bound + (le - lower_bound) * fraction
            lower_bound, lower_count = le, count
        return lower_bound


def parse_lag_histogram(text: str) -> LagHistogram | None:
    for family in text_string_to_metric_families(text):
        if family.name == FAMILY:
            buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name == FAMILY + "_bucket")
            return LagHistogram(tuple(buckets))
    return None


async def scrape_lag_histogram(base_url: str) -> LagHistogram | None:
    """The server's loop-lag histogram now, or ``None`` if it has none (or no ``/metrics``).

    Cancellation: safe, nothing to undo.
    """
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
            response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_lag_histogram(response.text)
