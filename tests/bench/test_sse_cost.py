"""bench/sse_cost.py runs against today's engine front end and SSE path (it drives the real
``AsyncEngine`` and sends as the server does), and its counts are those of the design:
every token streamed, about one write per stream per step, and a fan-out of 8 keeps every
pass after start-up to a part of the streams."""

from __future__ import annotations

import trio
import trio.testing

from bench.sse_cost import PassMeter, measure, stream_all

STREAMS, TOKENS = 48, 20


def pass_steps(fanout: int) -> list[int]:
    meter = PassMeter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(stream_all, STREAMS, TOKENS, 1, 0.03, fanout, clock=clock, instruments=[meter])
    return meter.pass_steps


def test_every_token_is_streamed_in_about_one_write_per_step():
    figures = measure(STREAMS, TOKENS, 1, 0.03, fanout=8)
    assert figures["tokens"] == STREAMS * TOKENS
    # per stream: the role chunk, one per token, the finish chunk, usage and [DONE]
    assert figures["events"] == STREAMS * (TOKENS + 4)
    assert 0.9 <= figures["writes_per_step_per_stream"] <= 1.2


def test_the_fanout_bounds_every_pass_after_start_up():
    """Unbounded, each step's 48 outputs wake all 48 consumers in one pass; with a fan-out
    of 8, only the start-up passes (every request starting at once) hold more than two
    groups' worth of task steps."""
    unbounded = pass_steps(1_000_000)
    bounded = pass_steps(8)
    assert sum(steps >= STREAMS for steps in unbounded) >= TOKENS
    assert sum(steps > 2 * 8 + 1 for steps in bounded) <= 2
