"""The figures ``GET /metrics`` exposes, read when scraped (Prometheus text format).

Nothing on the request path updates a metric: a scrape reads the ``statistics()`` the
components already keep (loop lag, admission, engine, preparation gates), so metrics cost
the serving path nothing. Families:

- ``vlserve_event_loop_lag_seconds``: histogram of the loop-lag monitor's wake-up lateness
  since start; ``vlserve_event_loop_lag_recent_seconds{quantile}``: p50 / p99 / max (1)
  over its recent window (``server.loop_lag``);
- ``vlserve_requests_in_flight``, ``vlserve_requests_limit``, ``vlserve_requests_refused_total``;
- ``vlserve_runtime_ready`` (1 while new requests are served);
- ``vlserve_engine_<figure>``: every number in the engine's statistics (counters for the
  cumulative ones in ``ENGINE_COUNTERS``), once the runtime is open;
- ``vlserve_gate_borrowed{gate}``, ``vlserve_gate_tokens{gate}``, ``vlserve_gate_waiting{gate}``:
  the preparation gates and the device gate;
- ``process_*``: CPU seconds, resident memory, open files of the server process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from server.lifecycle import Phase
from server.state import ServerState

ENGINE_COUNTERS = frozenset({"steps", "prompt_tokens", "generation_tokens"})


class ServerCollector:
    """A Prometheus collector over one app's ``ServerState``; ``collect()`` reads it now."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._process = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        yield from self._loop_lag()
        yield from self._requests()
        yield from self._engine()
        yield from self._gates()
        yield from self._process.collect()

    def _loop_lag(self) -> Iterator[Metric]:
        stats = self._state.lifecycle.loop_lag.statistics()
        yield HistogramMetricFamily(
            "vlserve_event_loop_lag_seconds",
            "How late a task that only sleeps woke up (event-loop lag), since start.",
            buckets=[(_bound(bound), count) for bound, count in stats.buckets],
            sum_value=stats.total_s,
        )
        recent = GaugeMetricFamily(
            "vlserve_event_loop_lag_recent_seconds",
            f"Event-loop lag over the last {stats.window} samples (quantile 1 is the max).",
            labels=["quantile"],
        )
        for quantile, value in (
            ("0.5", stats.p50_s),
            ("0.99", stats.p99_s),
            ("1", stats.max_s),
        ):
            recent.add_metric([quantile], value)
        yield recent

    def _requests(self) -> Iterator[Metric]:
        admission = self._state.admission.statistics()
        yield GaugeMetricFamily(
            "vlserve_requests_in_flight",
            "Requests holding an admission slot.",
            admission.in_flight,
        )
        yield GaugeMetricFamily(
            "vlserve_requests_limit",
            "Admission slots (max concurrent requests).",
            admission.limit,
        )
        yield CounterMetricFamily(
            "vlserve_requests_refused",
            "Requests refused with 503 (no slot).",
            admission.refused,
        )
        ready = self._state.lifecycle.phase is Phase.READY
        yield GaugeMetricFamily("vlserve_runtime_ready", "1 while new requests are served.", int(ready))

    def _engine(self) -> Iterator[Metric]:
        runtime = self._state.lifecycle.runtime
        statistics = getattr(getattr(runtime, "engine", None), "statistics", None)
        if statistics is None:
            return
        for name, value in _numbers(statistics()):
            family = CounterMetricFamily if name in ENGINE_COUNTERS else GaugeMetricFamily
            yield family(f"vlserve_engine_{name}", f"Engine statistics: {name}.", value)

    def _gates(self) -> Iterator[Metric]:
        runtime = self._state.lifecycle.runtime
        if runtime is None:
            return
        gates = []
        statistics = getattr(getattr(runtime, "preparer", None), "statistics", None)
        if statistics is not None:
            gates = [
                (gate.name, gate.borrowed, gate.total, gate.waiting)
                for gate in _fields(statistics())
                if all(hasattr(gate, a) for a in ("name", "borrowed", "total", "waiting"))
            ]
        device_gate = getattr(runtime, "device_gate", None)
        if device_gate is not None:
            stats = device_gate.statistics()
            gates.append(
                (
                    "device",
                    stats.borrowed_tokens,
                    int(stats.total_tokens),
                    stats.tasks_waiting,
                )
            )
        families = [
            GaugeMetricFamily("vlserve_gate_borrowed", "Gate tokens in use.", labels=["gate"]),
            GaugeMetricFamily("vlserve_gate_tokens", "Gate tokens in all.", labels=["gate"]),
            GaugeMetricFamily("vlserve_gate_waiting", "Tasks waiting at a gate.", labels=["gate"]),
        ]
        for name, *values in gates:
            for family, value in zip(families, values, strict=True):
                family.add_metric([name], value)
        yield from families


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _fields(stats: Any) -> Iterable[Any]:
    if not dataclasses.is_dataclass(stats):
        return ()
    return (getattr(stats, f.name) for f in dataclasses.fields(stats))


def _numbers(stats: Any) -> Iterator[tuple[str, float]]:
    """The int and float fields of a statistics dataclass, by name."""
    if not dataclasses.is_dataclass(stats):
        return
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield field.name, value
