"""The benchmark's loop-lag figures: a run's own histogram from two scrapes of /metrics."""

from __future__ import annotations

import math

import pytest

from bench.loadgen.loop_lag import LagHistogram, parse_lag_histogram

TEXT = """# HELP vlserve_event_loop_lag_seconds lag
# TYPE vlserve_event_loop_lag_seconds histogram
vlserve_event_loop_lag_seconds_bucket{le="0.001"} 90.0
vlserve_event_loop_lag_seconds_bucket{le="0.01"} 99.0
vlserve_event_loop_lag_seconds_bucket{le="+Inf"} 100.0
vlserve_event_loop_lag_seconds_count 100.0
vlserve_event_loop_lag_seconds_sum 0.5
"""


def test_parse_and_interpolate():
    lag = parse_lag_histogram(TEXT)
    assert lag.buckets == ((0.001, 90.0), (0.01, 99.0), (math.inf, 100.0))
    assert lag.quantile(0.5) == pytest.approx(0.001 * 50 / 90)
    assert lag.quantile(0.99) == pytest.approx(0.01)
    assert lag.quantile(0.999) == 0.01  # in +Inf: the last finite bound


def test_a_run_is_the_difference_of_two_scrapes():
    before = LagHistogram(((0.001, 90.0), (0.01, 99.0), (math.inf, 100.0)))
    after = LagHistogram(((0.001, 90.0), (0.01, 199.0), (math.inf, 200.0)))
    run = after.since(before)
    assert run.count == 100
    assert run.quantile(0.5) == pytest.approx(0.001 + 0.009 * 0.5)
    assert math.isnan(LagHistogram(()).quantile(0.5))


def test_servers_without_the_histogram_give_none():
    assert parse_lag_histogram("# nothing\nother_metric 1.0\n") is None
