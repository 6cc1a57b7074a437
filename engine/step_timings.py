"""What each engine step measured (``StepTimings``, sent with its ``StepOutputs``) and the
front end's histograms of it (``EngineHistograms``). No torch import here.

The step loop measures where the work runs (the engine worker process by default) and
sends a few numbers per step: the step's own seconds, the queue time of each sequence it
scheduled for the first time, and each vision-encoder batch of the step (images, seconds).
The front end (``AsyncEngine``) adds them to its histograms as it delivers the outputs, on
the event loop, with no lock and no polling; ``server.metrics`` reads them when scraped.

Queue time is vLLM's (``request_queue_time_seconds``): from the sequence's arrival in the
step loop to the step that first schedules it (its prefill, images encoded in it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.histogram import REQUEST_LATENCY_BUCKETS_S, Histogram

# seconds of one step (decode steps are milliseconds; a prefill with images, more)
STEP_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip
# seconds of one vision-encoder forward
ENCODE_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# images per vision-encoder forward
BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


@dataclass(frozen=True)
class StepTimings:
    """One step's figures: ``step_seconds``; ``queue_seconds`` of each sequence it
    scheduled first; ``encoder_batches``: (images, seconds) of each encoder forward."""

    step_seconds: float
    queue_seconds: tuple[float, ...] = ()
    encoder_batches: tuple[tuple[int, float], ...] = ()


@dataclass
class EngineHistograms:
    """Every step's timings since the engine started (the front end's, event-loop thread)."""

    step_time: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS_S))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS_S))
    encode_time: Histogram = field(default_factory=lambda: Histogram(ENCODE_BUCKETS_S))
    encoder_batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))

    def record(self, timings: StepTimings) -> None:
        self.step_time.observe(timings.step_seconds)
        for seconds in timings.queue_seconds:
            self.queue_time.observe(seconds)
        for images, seconds in timings.encoder_batches:
            self.encode_time.observe(seconds)
            self.encoder_batch_size.observe(images)
