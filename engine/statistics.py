"""``EngineStatistics`` (what an engine reports about itself) and ``StepTally`` (the
counters its step loop keeps to fill them). No torch import here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.engine_core import StepReport
    from engine.image_encoder import ImageEncoder
    from engine.model_runner import ModelRunner
    from engine.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStatistics:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cache_tokens: int = 0
    cache_bytes: int = 0
    last_step_seconds: float = 0.0
    device_gate_borrowed: int = 0
    # the vision encoder of the step loop (engine.image_encoder)
    encoder_batches: int = 0
    images_encoded: int = 0
    images_dropped: int = 0
    encoder_largest_batch: int = 0
    encoder_last_batch: int = 0
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    image_cache_bytes: int = 0
    images_pending: int = 0
    images_encoded_ahead: int = 0  # of images_encoded, on the encoder's ahead thread
    # the paged KV cache (engine.block_manager)
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0  # free or cached (allocatable)
    kv_blocks_cached: int = 0  # kept for prefix caching, evictable
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of those, found cached
    preemptions: int = 0


IDLE_STATISTICS = EngineStatistics()


@dataclass
class StepTally:
    """Counters fed by each step's report (by the step loop)."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_step_seconds: float = 0.0

    def record(self, report: StepReport) -> None:
        self.steps += 1
        self.prompt_tokens += report.prefill_tokens
        self.generation_tokens += sum(len(u.token_ids) for u in report.updates)
        self.last_step_seconds = report.seconds

    def statistics(self, scheduler: Scheduler, runner: ModelRunner, encoder: ImageEncoder | None) -> EngineStatistics:
        enc = encoder.statistics() if encoder is not None else None
        blocks = scheduler.blocks.statistics() if scheduler.blocks is not None else None
        return EngineStatistics(
            running=scheduler.num_running,
            waiting=scheduler.num_waiting,
            steps=self.steps,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            cache_tokens=runner.cache_tokens(),
            cache_bytes=runner.cache_bytes(),
            last_step_seconds=self.last_step_seconds,
            device_gate_borrowed=0,
            preemptions=scheduler.preemptions,
            **(
                {}
                if blocks is None
                else {
                    "kv_blocks_total": blocks.total,
                    "kv_blocks_free": blocks.free,
                    "kv_blocks_cached": blocks.cached,
                    "prefix_cache_queries": blocks.prefix_queries,
                    "prefix_cache_hits": blocks.prefix_hits,
                }
            ),
            **(
                {}
                if enc is None
                else {
                    "encoder_batches": enc.batches,
                    "images_encoded": enc.images_encoded,
                    "images_dropped": enc.images_dropped,
                    "encoder_largest_batch": enc.largest_batch,
                    "encoder_last_batch": enc.last_batch,
                    "image_cache_hits": enc.cache_hits,
                    "image_cache_misses": enc.cache_misses,
                    "image_cache_bytes": enc.cache_bytes,
                    "images_pending": enc.pending_images,
                    "images_encoded_ahead": enc.images_encoded_ahead,
                }
            ),
        )
