"""The figures the benchmark reports, computed from hand-made request records."""

from __future__ import annotations

import math

import pytest

from bench.loadgen.metrics import summarise
from bench.loadgen.options import LoadOptions
from bench.loadgen.request_result import RequestResult
from bench.loadgen.run import CUT_OFF, LoadRun


def _request(index: int, started: float, chunks: list[float], ended: float, tokens: int) -> RequestResult:
    return RequestResult(
        index=index, kind="text", started=started, ended=ended, ok=True, chunk_times=chunks, output_tokens=tokens
    )


def test_vllm_figures_health_window_and_cut_offs():
    run = LoadRun(options=LoadOptions(concurrency=2), server="s", workload="text")
    run.warmup_started, run.burst_started, run.burst_ended = 9.0, 10.0, 12.0
    run.results = [
        _request(0, 0.0, [0.1, 0.2, 0.4], 0.5, 5),  # TTFT 100 ms, TPOT (0.5-0.1)/4 = 100 ms
        _request(1, 0.0, [0.3, 0.5], 0.7, 3),  # TTFT 300 ms, TPOT (0.7-0.3)/2 = 200 ms
        RequestResult(index=2, kind="text", started=0.0, ended=1.0, error="HTTP 500: boom"),
        RequestResult(index=3, kind="text", started=0.0, ended=1.0, error=CUT_OFF),
    ]
    run.health = [(8.0, 0.001, 200), (10.5, 0.002, 200), (11.0, 0.004, 503), (13.0, 0.5, 200)]
    run.rss = [(10.0, 100 * 2**20), (11.0, 300 * 2**20)]
    run.foreign_cpu, run.steal_cpu = 0.05, 0.25
    s = summarise(run)
    assert (s.foreign_cpu_pct, s.steal_cpu_pct) == (pytest.approx(5.0), pytest.approx(25.0))
    assert (s.successful, s.failed, s.cut_off) == (2, 1, 1)
    assert s.duration_s == pytest.approx(2.0)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(4.0)
    assert s.mean_ttft_ms == pytest.approx(200.0)
    assert s.mean_tpot_ms == pytest.approx(150.0)
    assert s.mean_itl_ms == pytest.approx((100 + 200 + 200) / 3)
    assert s.mean_e2el_ms == pytest.approx(600.0)
    assert s.health_probes == 2 and s.health_failures == 1  # only probes sent during the burst
    assert s.health_max_ms == pytest.approx(4.0)
    assert s.health_idle_p50_ms == pytest.approx(1.0)
    assert s.peak_rss_mib == pytest.approx(300.0)
    assert s.first_error == "HTTP 500: boom"
    assert "Successful requests:" in s.vllm_report() and "P99 TTFT (ms):" in s.vllm_report()
    assert "CPU stolen by the hypervisor (% of machine):" in s.vllm_report()


def test_a_run_with_no_successes_reports_nan_not_errors():
    run = LoadRun(options=LoadOptions(), server="s", workload="text")
    run.burst_started, run.burst_ended = 1.0, 2.0
    run.results = [RequestResult(index=0, kind="text", started=0.0, ended=1.0, error="HTTP 503: busy")]
    s = summarise(run)
    assert s.successful == 0 and s.failed == 1
    assert math.isnan(s.mean_ttft_ms) and math.isnan(s.health_p99_ms)
