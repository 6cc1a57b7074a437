"""Drive engine streams in tests; the same for the in-thread and the worker-process engine."""

from __future__ import annotations

import trio


async def run_stream(engine, prompt, params):
    """Every delta of one request, in order."""
    deltas = []
    async with engine.open_stream(prompt, params) as stream:
        async for delta in stream:
            deltas.append(delta)
    return deltas


async def wait_until_idle(engine, timeout: float = 5.0):
    """Wait until the engine reports no running or waiting sequence and an empty cache;
    fail the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        # polls: the figures come from the step loop (maybe another process), with no event to wait on
        while engine.statistics().running or engine.statistics().waiting or engine.statistics().cache_tokens:
            await trio.sleep(0.005)
