"""Request-level figures, fed by events of the requests themselves (no polling).

``RequestRecord`` follows one HTTP request: ``server.request_observer`` creates it when the
request arrives and finishes it after the last byte of the response, and the generation
code (``server.generation.stream_jobs``) reports to it when the prompt is ready and as
each delta arrives. Each event costs a clock read and a few additions in the request's own
task: no lock, no task switch. ``RequestMetrics`` accumulates what the records report,
and ``server.metrics`` reads it when ``/metrics`` is scraped. Every figure lives in the
event loop's thread, so no lock is needed.

The histograms are vLLM's where one exists (``docs/architecture.md``, "Metrics"): time to
first token, inter-token latency, end-to-end latency, prompt and generation tokens per
request, and requests by finish reason; times are measured from the HTTP request's arrival.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.histogram import REQUEST_LATENCY_BUCKETS_S, Histogram
from vl.prep_timings import PREP_SUMMARY_FIELDS

if TYPE_CHECKING:
    from engine.outputs import StreamDelta
    from server.generation import Job
    from vl.prep_timings import PrepTimings

# vLLM's bucket bounds for the same figures (seconds, then tokens).
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
# Arrival to prompt ready (body read, validation, images, template, tokenization).
PREPARE_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
# One preparation stage of one image (or the template and tokens), and one wait at a gate.
STAGE_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip
GATE_WAIT_BUCKETS_S = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
)  # fmt: skip
TOKEN_BUCKETS = tuple(float(n) for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000))


@dataclass
class RequestMetrics:
    """What finished (and running) requests reported, since start."""

    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS_S))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS_S))
    prepare_time: Histogram = field(default_factory=lambda: Histogram(PREPARE_BUCKETS_S))
    prompt_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    generation_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))
    # choices that ended by finish reason ("stop", "length", "abort"), of answered requests
    success: Counter[str] = field(default_factory=Counter)
    # responses by status class ("2xx", "4xx", "5xx"; "cut" for a response never started)
    responses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    # preparation stages ("fetch", "decode", ...) and gate waits ("tokenizer", ...), by name
    prep_stages: dict[str, Histogram] = field(default_factory=dict)
    gate_waits: dict[str, Histogram] = field(default_factory=dict)

    def record_prep(self, timings: PrepTimings) -> None:
        """Count one request's preparation figures (``vl.prep_timings``)."""
        for name, seconds in timings.stages:
            _histogram_for(self.prep_stages, name, STAGE_BUCKETS_S).observe(seconds)
        for gate, seconds in timings.gate_waits:
            self.observe_gate_wait(gate, seconds)

    def observe_gate_wait(self, gate: str, seconds: float) -> None:
        """Count one wait at ``gate`` (also fed directly: the ``parse`` limiter, ``server.app``)."""
        _histogram_for(self.gate_waits, gate, GATE_WAIT_BUCKETS_S).observe(seconds)


def _histogram_for(histograms: dict[str, Histogram], name: str, bounds: tuple[float, ...]) -> Histogram:
    histogram = histograms.get(name)
    if histogram is None:
        histogram = histograms[name] = Histogram(bounds)
    return histogram


@dataclass
class RequestRecord:
    """One HTTP request's figures; times are ``time.perf_counter()`` readings."""

    method: str
    path: str
    metrics: RequestMetrics
    arrived: float = field(default_factory=time.perf_counter)
    request_id: str = "-"
    status: int | None = None
    complete: bool = False
    images: int = 0
    prepared: float | None = None
    first_token: float | None = None
    ended: float | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)
    prep: PrepTimings | None = None
    _last_token: float = 0.0
    _prompt_tokens: dict[int, int] = field(default_factory=dict)
    _completion_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompt_tokens.values())

    @property
    def completion_tokens(self) -> int:
        return sum(self._completion_tokens.values())

    def prompt_ready(self, jobs: Iterable[Job]) -> None:
        """The prompts are prepared and generation starts (called once per request)."""
        self.prepared = time.perf_counter()
        prompts = {job.prompt_index: job.prompt for job in jobs}
        self.images = sum(len(prompt.images) for prompt in prompts.values())
        self.metrics.prepare_time.observe(self.prepared - self.arrived)
        self.metrics.images += self.images

    def prep_measured(self, timings: PrepTimings | None) -> None:
        """Where the prompt's preparation time went (``PreparedPrompt.timings``): counted
        in the histograms now, and in this request's access-log line."""
        if timings is None:
            return
        self.prep = timings
        self.metrics.record_prep(timings)

    def delta(self, job: Job, delta: StreamDelta) -> None:
        """A delta of choice ``job`` arrived from the engine."""
        self._prompt_tokens[job.prompt_index] = delta.prompt_tokens
        self._completion_tokens[job.index] = delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish_reasons[job.index] = delta.finish_reason
        tokens = len(delta.token_ids)
        if not tokens:
            return
        now = time.perf_counter()
        if self.first_token is None:
            # a final-only delta (a response that is not streamed) holds every token: the
            # first one arrived at ``first_token_time``, the rest spread until now
            first = delta.first_token_time if delta.first_token_time is not None else now
            self.first_token = first
            self.metrics.time_to_first_token.observe(first - self.arrived)
            if tokens > 1 and first < now:
                self.metrics.inter_token_latency.observe((now - first) / (tokens - 1), tokens - 1)
        else:
            # a delta may carry several tokens (the engine coalesces for a slow reader):
            # each counts as one gap of the average length
            self.metrics.inter_token_latency.observe((now - self._last_token) / tokens, tokens)
        self._last_token = now

    def finish(self) -> None:
        """The response is over (sent whole, cut, or never started)."""
        self.ended = time.perf_counter()
        metrics = self.metrics
        metrics.e2e_latency.observe(self.ended - self.arrived)
        metrics.responses["cut" if self.status is None else f"{self.status // 100}xx"] += 1
        if self.prepared is None:
            return
        metrics.prompt_tokens.observe(self.prompt_tokens)
        metrics.generation_tokens.observe(self.completion_tokens)
        if self.status is not None and self.status < 400 and self.complete:
            metrics.success.update(self.finish_reasons.values())

    def summary(self) -> dict[str, Any]:
        """The access-log fields (``server.access_log``); times in milliseconds."""
        ended = self.ended if self.ended is not None else time.perf_counter()
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "complete": self.complete,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "images": self.images,
            "prepare_ms": _ms(self.prepared, self.arrived),
            "ttft_ms": _ms(self.first_token, self.arrived),
            "total_ms": _ms(ended, self.arrived),
            "finish_reason": ",".join(sorted(set(self.finish_reasons.values()))) or None,
            **(self.prep.summary_ms() if self.prep is not None else dict.fromkeys(PREP_SUMMARY_FIELDS)),
        }


def _ms(at: float | None, since: float) -> float | None:
    return None if at is None else round((at - since) * 1000, 2)
