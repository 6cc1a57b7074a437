"""The figures ``GET /metrics`` exposes (Prometheus text format).

Three sources, none of which polls: the ``statistics()`` the components already keep
(loop lag, admission, engine, preparation gates, pixel slots, feature cache), read when
scraped; the request-level figures that each request's own events feed
(``server.request_metrics``, with each chat's ``vl.prep_timings.PrepTimings``); and the
engine's per-step timings, which the step loop sends with its outputs
(``engine.step_timings``).

vLLM's families, under its names and ``model_name`` label, with the prefix
``vlserve:`` (``--metrics-prefix vllm`` gives ``vllm:``, so vLLM dashboards work unchanged):

- ``<p>:num_requests_running``, ``<p>:num_requests_waiting`` (the engine's scheduler);
- ``<p>:kv_cache_usage_perc``: KV-cache blocks held by running sequences over all blocks
  (free and prefix-cached blocks count as unused, as vLLM counts them);
- ``<p>:prefix_cache_queries_total``, ``<p>:prefix_cache_hits_total`` (prompt tokens, as vLLM),
  ``<p>:num_preemptions_total``;
- ``<p>:prompt_tokens_total``, ``<p>:generation_tokens_total`` (the engine's counts);
- ``<p>:time_to_first_token_seconds``, ``<p>:inter_token_latency_seconds``,
  ``<p>:e2e_request_latency_seconds`` (from the HTTP request's arrival),
  ``<p>:request_prompt_tokens``, ``<p>:request_generation_tokens`` (histograms);
- ``<p>:request_success_total{finished_reason}`` (choices of requests answered whole);
- ``<p>:mm_cache_queries_total``, ``<p>:mm_cache_hits_total`` (the engine's image feature
  cache);
- ``<p>:request_queue_time_seconds``: a sequence's arrival in the step loop to the step
  that first schedules it.

vlserve's own, the figures that explain a slow probe or a slow first token:

- ``vlserve_event_loop_lag_seconds``: histogram of the loop-lag monitor's wake-up lateness
  since start; ``vlserve_event_loop_lag_recent_seconds{quantile}``: p50 / p99 / max (1)
  over its recent window (``server.loop_lag``);
- ``vlserve_request_prepare_seconds``: arrival to prompt ready (body, images, template,
  tokens); ``vlserve_responses_total{code_class}``; ``vlserve_images_total``;
- ``vlserve_requests_in_flight``, ``vlserve_requests_limit``, ``vlserve_requests_refused_total``
  (admission);
- ``vlserve_runtime_ready`` (1 while new requests are served);
- ``vlserve_engine_<figure>``: every number in the engine's statistics (counters for the
  cumulative ones in ``ENGINE_COUNTERS``), once the runtime is open: step time, the
  vision encoder's batches and batch sizes, the image cache;
- ``vlserve_prep_stage_seconds{stage}``: fetch, decode, preprocess (per image), tokenize
  (per request), encode (per vision-encoder forward); ``vlserve_gate_wait_seconds{gate}``:
  waits for tokenizer, image_prep, fetch, parse and pixel_slots;
- ``vlserve_engine_step_seconds``, ``vlserve_encoder_batch_size`` (histograms);
- ``vlserve_gate_borrowed{gate}``, ``vlserve_gate_tokens{gate}``, ``vlserve_gate_waiting{gate}``,
  ``vlserve_gate_completed_total{gate}``: the preparation gates, the fetch limiter, the
  pixel slots and the device gate;
- ``process_*``: CPU seconds, resident memory, open files of the server process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine.histogram import Histogram
from engine.step_timings import ENCODE_BUCKETS_S
from server.lifecycle import Phase
from server.request_metrics import GATE_WAIT_BUCKETS_S, STAGE_BUCKETS_S
from server.state import ServerState
from vl.prep_timings import GATES, STAGES

ENGINE_COUNTERS = frozenset(
    {
        "steps",
        "prompt_tokens",
        "generation_tokens",
        "encoder_batches",
        "images_encoded",
        "images_encoded_ahead",
        "images_dropped",
        "image_cache_hits",
        "image_cache_misses",
    }
)


def metrics_text(state: ServerState) -> tuple[bytes, str]:
    """The exposition text of every figure, read now, and its content type."""
    return generate_latest(ServerCollector(state)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]


class ServerCollector:
    """A Prometheus collector over one app's ``ServerState``; ``collect()`` reads it now."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._process = ProcessCollector(registry=None)
        self._prefix = state.config.metrics_prefix
        self._model = state.config.model_name

    def collect(self) -> Iterator[Metric]:
        yield from self._vllm_engine()
        yield from self._vllm_requests()
        yield from self._loop_lag()
        yield from self._requests()
        yield from self._engine()
        yield from self._engine_timings()
        yield from self._prep()
        yield from self._gates()
        yield from self._process.collect()

    def _vllm_name(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    def _vllm_gauge(self, name: str, documentation: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self._vllm_name(name), documentation, labels=["model_name"])
        family.add_metric([self._model], value)
        return family

    def _vllm_counter(self, name: str, documentation: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(self._vllm_name(name), documentation, labels=["model_name"])
        family.add_metric([self._model], value)
        return family

    def _vllm_histogram(self, name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
        return _histogram(self._vllm_name(name), documentation, histogram, {"model_name": self._model})

    def _vllm_engine(self) -> Iterator[Metric]:
        runtime = self._state.lifecycle.runtime
        statistics = getattr(getattr(runtime, "engine", None), "statistics", None)
        if statistics is None:
            return
        stats = dict(_numbers(statistics()))  # read defensively: any engine's statistics
        if "running" in stats:
            yield self._vllm_gauge("num_requests_running", "Requests in the engine's running batch.", stats["running"])
        if "waiting" in stats:
            yield self._vllm_gauge("num_requests_waiting", "Requests waiting for the engine.", stats["waiting"])
        if stats.get("kv_blocks_total"):
            used = stats["kv_blocks_total"] - stats.get("kv_blocks_free", 0)
            yield self._vllm_gauge(
                "kv_cache_usage_perc",
                "KV-cache blocks held by running sequences over all blocks, 0 to 1.",
                used / stats["kv_blocks_total"],
            )
        if "prefix_cache_queries" in stats and "prefix_cache_hits" in stats:
            yield self._vllm_counter(
                "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats["prefix_cache_queries"]
            )
            yield self._vllm_counter(
                "prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats["prefix_cache_hits"]
            )
        if "preemptions" in stats:
            yield self._vllm_counter(
                "num_preemptions", "Sequences preempted for KV-cache blocks.", stats["preemptions"]
            )
        if "prompt_tokens" in stats:
            yield self._vllm_counter("prompt_tokens", "Prompt tokens prefilled.", stats["prompt_tokens"])
        if "generation_tokens" in stats:
            yield self._vllm_counter("generation_tokens", "Tokens generated.", stats["generation_tokens"])
        if "image_cache_hits" in stats and "image_cache_misses" in stats:
            hits = stats["image_cache_hits"]
            queries = hits + stats["image_cache_misses"]
            yield self._vllm_counter("mm_cache_queries", "Image feature cache lookups.", queries)
            yield self._vllm_counter("mm_cache_hits", "Image feature cache hits.", hits)

    def _vllm_requests(self) -> Iterator[Metric]:
        metrics = self._state.request_metrics
        yield self._vllm_histogram(
            "time_to_first_token_seconds",
            "Time from the request's arrival to its first generated token.",
            metrics.time_to_first_token,
        )
        yield self._vllm_histogram(
            "inter_token_latency_seconds", "Time between generated tokens of a request.", metrics.inter_token_latency
        )
        yield self._vllm_histogram(
            "e2e_request_latency_seconds", "Time from arrival to the response's end.", metrics.e2e_latency
        )
        yield self._vllm_histogram("request_prompt_tokens", "Prompt tokens per request.", metrics.prompt_tokens)
        yield self._vllm_histogram(
            "request_generation_tokens", "Generated tokens per request.", metrics.generation_tokens
        )
        success = CounterMetricFamily(
            self._vllm_name("request_success"),
            "Choices of requests answered whole, by finish reason.",
            labels=["model_name", "finished_reason"],
        )
        for reason, count in sorted(metrics.success.items()):
            success.add_metric([self._model, reason], count)
        yield success
        yield _histogram(
            "vlserve_request_prepare_seconds",
            "Time from arrival to prompt ready (body, images, template, tokens).",
            metrics.prepare_time,
        )
        responses = CounterMetricFamily("vlserve_responses", "API responses by status class.", labels=["code_class"])
        for code_class, count in sorted(metrics.responses.items()):
            responses.add_metric([code_class], count)
        yield responses
        yield CounterMetricFamily("vlserve_images", "Images in prepared prompts.", metrics.images)

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

    def _engine_timings(self) -> Iterator[Metric]:
        """The step loop's per-step figures (``engine.step_timings``), once the runtime is open."""
        histograms = getattr(getattr(self._state.lifecycle.runtime, "engine", None), "histograms", None)
        if histograms is None:
            return
        yield self._vllm_histogram(
            "request_queue_time_seconds",
            "Time from a sequence's arrival in the engine to the step that first schedules it.",
            histograms.queue_time,
        )
        yield _histogram("vlserve_engine_step_seconds", "Seconds of one engine step.", histograms.step_time)
        yield _histogram(
            "vlserve_encoder_batch_size", "Images per vision-encoder forward.", histograms.encoder_batch_size
        )

    def _prep(self) -> Iterator[Metric]:
        """Per-stage and per-gate-wait histograms (``vl.prep_timings``); ``encode`` comes from
        the engine (one observation per encoder forward)."""
        metrics = self._state.request_metrics
        stages = {name: metrics.prep_stages.get(name) or Histogram(STAGE_BUCKETS_S) for name in STAGES}
        stages.update(metrics.prep_stages)
        histograms = getattr(getattr(self._state.lifecycle.runtime, "engine", None), "histograms", None)
        stages["encode"] = histograms.encode_time if histograms is not None else Histogram(ENCODE_BUCKETS_S)
        yield _labeled_histograms(
            "vlserve_prep_stage_seconds",
            "Seconds of one preparation stage: fetch, decode, preprocess (per image), tokenize (template and "
            "tokens, per request), encode (per vision-encoder forward, in the engine's step).",
            "stage",
            stages,
        )
        waits = {name: metrics.gate_waits.get(name) or Histogram(GATE_WAIT_BUCKETS_S) for name in GATES}
        waits.update(metrics.gate_waits)
        yield _labeled_histograms(
            "vlserve_gate_wait_seconds",
            "Seconds a request waited for a gate's token (tokenizer, image_prep) or a free pixel slot.",
            "gate",
            waits,
        )

    def _gates(self) -> Iterator[Metric]:
        runtime = self._state.lifecycle.runtime
        if runtime is None:
            return
        gates = []
        statistics = getattr(getattr(runtime, "preparer", None), "statistics", None)
        if statistics is not None:
            preparer_stats = statistics()
            gates = [
                (gate.name, gate.borrowed, gate.total, gate.waiting, getattr(gate, "completed", None))
                for gate in _fields(preparer_stats)
                if all(hasattr(gate, a) for a in ("name", "borrowed", "total", "waiting"))
            ]
            fetcher = getattr(preparer_stats, "fetcher", None)
            if fetcher is not None:
                gates.append(
                    ("fetch", fetcher.limiter_borrowed, int(fetcher.limiter_total), fetcher.waiting, fetcher.fetched)
                )
        slots = getattr(runtime, "slots", None)
        if slots is not None:
            stats = slots.statistics()
            gates.append(("pixel_slots", stats.total - stats.free, stats.total, stats.waiting, stats.acquired))
        device_gate = getattr(runtime, "device_gate", None)
        if device_gate is not None:
            stats = device_gate.statistics()
            gates.append(
                (
                    "device",
                    stats.borrowed_tokens,
                    int(stats.total_tokens),
                    stats.tasks_waiting,
                    None,
                )
            )
        families = [
            GaugeMetricFamily("vlserve_gate_borrowed", "Gate tokens in use.", labels=["gate"]),
            GaugeMetricFamily("vlserve_gate_tokens", "Gate tokens in all.", labels=["gate"]),
            GaugeMetricFamily("vlserve_gate_waiting", "Tasks waiting at a gate.", labels=["gate"]),
            CounterMetricFamily(
                "vlserve_gate_completed", "Work items a gate completed (pixel_slots: slots taken).", labels=["gate"]
            ),
        ]
        for name, *values in gates:
            for family, value in zip(families, values, strict=True):
                if value is not None:
                    family.add_metric([name], value)
        yield from families


def _histogram(
    name: str, documentation: str, histogram: Histogram, labels: dict[str, str] | None = None
) -> HistogramMetricFamily:
    labels = labels or {}
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    buckets = [(_bound(bound), count) for bound, count in histogram.buckets()]
    family.add_metric(list(labels.values()), buckets, histogram.total)
    return family


def _labeled_histograms(
    name: str, documentation: str, label: str, histograms: dict[str, Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, histogram in histograms.items():
        buckets = [(_bound(bound), count) for bound, count in histogram.buckets()]
        family.add_metric([value], buckets, histogram.total)
    return family


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
