"""``EngineHistograms``: what the front end counts from each step's ``StepTimings``."""

from __future__ import annotations

from engine.step_timings import EngineHistograms, StepTimings


def test_step_timings_feed_the_step_queue_encode_and_batch_size_histograms():
    histograms = EngineHistograms()
    histograms.record(StepTimings(0.02, queue_seconds=(0.5, 1.25), encoder_batches=((3, 0.2), (1, 0.05))))
    histograms.record(StepTimings(0.004))
    assert histograms.step_time.count == 2 and abs(histograms.step_time.total - 0.024) < 1e-12
    assert histograms.queue_time.count == 2 and histograms.queue_time.total == 1.75
    assert histograms.encode_time.count == 2 and abs(histograms.encode_time.total - 0.25) < 1e-12
    assert histograms.encoder_batch_size.count == 2 and histograms.encoder_batch_size.total == 4
    assert dict(histograms.encoder_batch_size.buckets())[1.0] == 1  # the batch of one
    assert dict(histograms.encoder_batch_size.buckets())[4.0] == 2
