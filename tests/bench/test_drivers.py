"""The load generator's drivers: how many requests run at once, when they start, when
issuing stops. Fake sends on trio's autojump clock: no server, no real waiting."""

from __future__ import annotations

import trio

from bench.loadgen.drivers import closed_loop, poisson


class FakeServer:
    """Records each request's start time and the peak number in flight."""

    def __init__(self, seconds_per_request: float) -> None:
        self.seconds = seconds_per_request
        self.starts: list[tuple[int, float]] = []
        self.in_flight = 0
        self.peak = 0

    async def send(self, index: int) -> None:
        self.starts.append((index, trio.current_time()))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(self.seconds)
        finally:
            self.in_flight -= 1


async def test_closed_loop_keeps_exactly_concurrency_requests_in_flight(autojump_clock):
    server = FakeServer(1.0)
    await closed_loop(server.send, list(range(10)), concurrency=4)
    assert sorted(i for i, _ in server.starts) == list(range(10))
    assert server.peak == 4
    assert [t for _, t in server.starts[:4]] == [0.0] * 4  # all clients start at once
    assert trio.current_time() == 3.0  # 10 requests, 4 at a time, 1 s each


async def test_closed_loop_stops_issuing_at_the_deadline(autojump_clock):
    server = FakeServer(1.0)
    await closed_loop(server.send, list(range(100)), concurrency=2, stop_issuing=2.5)
    assert len(server.starts) == 6  # starts at 0, 1 and 2 s; none at 3 s
    assert max(t for _, t in server.starts) < 2.5


async def test_poisson_arrivals_follow_the_rate_and_repeat_for_a_seed(autojump_clock):
    first = FakeServer(0.01)
    await poisson(first.send, list(range(200)), rate=20.0, max_in_flight=1000, seed=7)
    times = [t for _, t in first.starts]
    assert len(times) == 200 and times == sorted(times)
    assert 7.0 < times[-1] < 13.0  # 200 arrivals at 20/s take about 10 s
    second = FakeServer(0.01)
    start = trio.current_time()
    await poisson(second.send, list(range(200)), rate=20.0, max_in_flight=1000, seed=7)
    assert [round(t - start, 6) for _, t in second.starts] == [round(t, 6) for t in times]


async def test_poisson_caps_requests_in_flight(autojump_clock):
    server = FakeServer(5.0)
    await poisson(server.send, list(range(50)), rate=100.0, max_in_flight=3, seed=1)
    assert len(server.starts) == 50
    assert server.peak == 3
