"""The loop-lag monitor measures how late it wakes, in trio's (here: mock) time."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from server.loop_lag import LoopLagMonitor, nearest_rank


def block_the_loop(clock: trio.testing.MockClock, seconds: float) -> None:
    """Hold the event loop (no checkpoint) for ``seconds`` of mock time."""
    clock.jump(seconds)


async def test_on_time_wakeups_read_zero_and_a_blocked_loop_reads_its_block(mock_clock):
    """Steps of exactly one interval are on time; a step that holds the loop for 35 ms
    past a deadline is measured as 35 ms late, in p99, max and the histogram."""
    clock = mock_clock  # no autojump: time moves only when this test moves it
    monitor = LoopLagMonitor(interval=0.01, window=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(99):
            clock.jump(0.01)
            await trio.testing.wait_all_tasks_blocked()
        block_the_loop(clock, 0.045)  # the next deadline was 10 ms away
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    stats = monitor.statistics()
    assert stats.samples == 100 and stats.window == 100
    assert stats.p50_s == 0.0
    assert stats.max_s == pytest.approx(0.035)
    assert stats.p99_s == 0.0  # one late sample in 100 is the max, not the p99
    assert stats.total_s == pytest.approx(0.035)
    buckets = dict(stats.buckets)
    assert buckets[0.0005] == 99 and buckets[0.030] == 99 and buckets[0.050] == 100
    assert buckets[math.inf] == 100


async def test_the_window_forgets_old_samples_the_histogram_does_not():
    monitor = LoopLagMonitor(window=3)
    for lateness in [0.5, 0.001, 0.002, 0.003, -1.0]:
        monitor.record(lateness)
    stats = monitor.statistics()
    assert stats.window == 3 and stats.max_s == 0.003 and stats.p50_s == 0.002
    assert stats.samples == 5 and dict(stats.buckets)[0.250] == 4  # -1 counts as 0


def test_nearest_rank():
    ordered = [float(i) for i in range(1, 101)]
    assert nearest_rank(ordered, 0.5) == 50.0
    assert nearest_rank(ordered, 0.99) == 99.0
    assert nearest_rank([], 0.99) == 0.0


async def test_lifecycle_runs_the_monitor_for_as_long_as_it_runs(autojump_clock, vlserve_config):
    """The lifecycle owns the monitor: samples accrue while it runs, none after it stops."""
    from server.lifecycle import RuntimeLifecycle
    from tests.server.fakes import FakeRuntime, FakeRuntimeFactory

    lifecycle = RuntimeLifecycle(vlserve_config, FakeRuntimeFactory(FakeRuntime(vlserve_config)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lifecycle.run)
        await lifecycle.wait_ready()
        await trio.sleep(1.0)
        lifecycle.stop()
        await lifecycle.wait_closed()
    samples = lifecycle.loop_lag.statistics().samples
    assert samples >= 99
    await trio.sleep(1.0)
    assert lifecycle.loop_lag.statistics().samples == samples
