"""RequestStream pacing: intervals between deltas are at least ``min_interval`` and, with a
spread, stretched by a random amount up to ``spread`` times it, so streams fed by the same
engine steps drift apart instead of waking together."""

from __future__ import annotations

import itertools
import random
import time

import pytest
import trio
import trio.testing

from engine.core_messages import SequenceOutput
from engine.request_stream import RequestStream

TOKENS = 200
STEP = 0.001


async def paced_take_times(spread: float, seed: int) -> list[float]:
    """Feed one token per millisecond for 200 ms; return when each delta was taken."""
    stream = RequestStream(0, 3, min_interval=0.01, spread=spread, rng=random.Random(seed))
    times = []

    async def engine():
        for i in range(TOKENS):
            await trio.sleep(STEP)
            stream.push(SequenceOutput(0, [i], "x", None, "length" if i == TOKENS - 1 else None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine)
        async for delta in stream:
            times.append((trio.current_time(), delta.finish_reason))
    return times


@pytest.mark.parametrize("spread", [0.0, 0.5])
async def test_intervals_are_between_min_and_stretched_max(spread, autojump_clock):
    times = await paced_take_times(spread, seed=1)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(times) if b[1] is None]
    assert gaps
    assert all(0.01 - 1e-9 <= gap <= 0.01 * (1 + spread) + STEP + 1e-9 for gap in gaps)
    if spread:
        assert max(gaps) - min(gaps) > 0.002  # actually spread, not one fixed interval
    else:
        assert max(gaps) - min(gaps) < STEP + 1e-9


async def test_two_streams_fed_together_drift_apart(autojump_clock):
    """Same feed, different draws: after the first few deltas the two streams no longer
    take their deltas at the same instants."""
    first = [t for t, _ in await paced_take_times(0.5, seed=1)]
    second = [t for t, _ in await paced_take_times(0.5, seed=2)]
    assert set(first[3:-1]) != set(second[3:-1])


class TaskSteps(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_consumer_wakes_once_per_output_when_steps_are_slower_than_the_interval(autojump_clock):
    """A consumer whose interval has ended before the next output arrives sleeps until that
    output, instead of waking at the interval's end to find nothing: one wake-up per step's
    output (the stream's cost on the event loop is per delta, not per timer)."""
    stream = RequestStream(0, 3, min_interval=0.01, spread=0.0)
    steps = 5
    deltas = []
    counted: list[TaskSteps] = []

    async def consume():
        counter = TaskSteps(trio.lowlevel.current_task())
        counted.append(counter)
        trio.lowlevel.add_instrument(counter)
        try:
            async for delta in stream:
                deltas.append(delta)
        finally:
            trio.lowlevel.remove_instrument(counter)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(steps):
            await trio.sleep(0.05)  # a step five intervals long
            stream.push(SequenceOutput(0, [i], "x", None, "length" if i == steps - 1 else None))
    assert [d.token_ids for d in deltas] == [[i] for i in range(steps)]
    # one step to start and park, one per delta (the last one also returns the end)
    assert counted[0].steps <= steps + 2


async def test_a_final_only_stream_wakes_its_consumer_once_with_everything(autojump_clock):
    """Invariant: a final-only stream (a response that is not streamed) gives its consumer
    exactly one delta, when the sequence ends, however many steps fed it: the consumer
    sleeps through the steps. The delta holds every token, the whole text and the finish
    reason, and says when the first token arrived (before the last)."""
    stream = RequestStream(0, 3, final_only=True, min_interval=0.01)
    deltas, woke_early = [], []
    first_push = last_push = None

    async def consume():
        async for delta in stream:
            deltas.append((trio.current_time(), delta))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(10):
            await trio.sleep(0.005)
            if i == 0:
                first_push = time.perf_counter()
            if i == 9:
                last_push = time.perf_counter()
            stream.push(SequenceOutput(0, [i], f"t{i} ", None, "length" if i == 9 else None))
            await trio.testing.wait_all_tasks_blocked()
            woke_early.append(bool(deltas))
    assert woke_early == [False] * 9 + [True]
    [(_, delta)] = deltas
    assert delta.token_ids == list(range(10)) and delta.text == "".join(f"t{i} " for i in range(10))
    assert delta.finish_reason == "length" and delta.completion_tokens == 10
    assert first_push <= delta.first_token_time <= last_push


async def test_a_final_only_stream_that_fails_ends_with_one_delta():
    stream = RequestStream(0, 3, final_only=True)
    stream.push(SequenceOutput(0, [1], "a", None, None))
    stream.fail("the engine stopped")
    deltas = [delta async for delta in stream]
    assert [(d.token_ids, d.finish_reason) for d in deltas] == [([1], "abort")]
    assert stream.error == "the engine stopped"
