"""bench/sse_cost.py runs against today's engine front end and SSE path (it drives the real
``AsyncEngine``), and its counts are those of the design: every token streamed, about one
write per stream per step, and a fan-out of 16 keeps each pass to a part of the streams."""

from __future__ import annotations

from bench.sse_cost import measure


def test_every_token_is_streamed_and_the_fanout_bounds_a_pass():
    streams, tokens = 48, 6
    bounded = measure(streams, tokens, 1, 0.03, fanout=8)
    unbounded = measure(streams, tokens, 1, 0.03, fanout=1_000_000)
    for figures in (bounded, unbounded):
        assert figures["tokens"] == streams * tokens
        # per stream: the role chunk, one per token, the finish chunk, usage and [DONE]
        assert figures["events"] == streams * (tokens + 4)
        assert 0.9 <= figures["writes_per_step_per_stream"] <= 1.5
    # a step's 48 outputs wake all 48 consumers in one pass without a bound, not with it
    assert unbounded["pass_steps_p50"] >= streams
    assert bounded["pass_steps_p50"] < streams
