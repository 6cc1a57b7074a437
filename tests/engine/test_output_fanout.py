"""``OutputFanout``: a step's outputs reach at most ``per_pass`` streams per scheduler pass,
in order, and none is lost when the step loop stops. Passes are counted by an instrument
(one pass = the tasks run between two I/O waits); no real clock is involved."""

from __future__ import annotations

import trio
import trio.testing

from engine.async_engine import AsyncEngine
from engine.core_messages import SequenceOutput, StepOutputs
from engine.output_fanout import OutputFanout
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.statistics import IDLE_STATISTICS
from engine.stream_registry import StreamRegistry

PROMPT = EnginePrompt([1, 2, 3])
PARAMS = SamplingParams(max_tokens=4)


class PassCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.passes = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


def output(seq_id: int, token: int, finish: str | None = None) -> SequenceOutput:
    return SequenceOutput(seq_id, [token], f"<{token}>", None, finish)


async def test_a_step_reaches_at_most_per_pass_streams_per_pass():
    """Of one step's 50 outputs, 8 reach their streams in the pass that delivers them and
    8 more in each pass after; each consumer gets exactly its own output."""
    registry = StreamRegistry(0.0)
    fanout = OutputFanout(registry, per_pass=8)
    streams = [registry.open(PROMPT, PARAMS) for _ in range(50)]
    counter = PassCounter()
    trio.lowlevel.add_instrument(counter)
    woken_in_pass: dict[int, int] = {}
    got: dict[int, list[int]] = {}
    all_got = trio.Event()

    async def consume(stream):
        delta = await stream.__anext__()
        woken_in_pass[stream.seq_id] = counter.passes
        got[stream.seq_id] = delta.token_ids
        if len(got) == len(streams):
            all_got.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fanout.run)
            for stream in streams:
                nursery.start_soon(consume, stream)
            await trio.testing.wait_all_tasks_blocked()
            fanout.deliver([output(s.seq_id, 100 + s.seq_id) for s in streams])
            assert fanout.backlog == 50 - 8
            await all_got.wait()
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert got == {s.seq_id: [100 + s.seq_id] for s in streams}
    per_pass: dict[int, int] = {}
    for pass_index in woken_in_pass.values():
        per_pass[pass_index] = per_pass.get(pass_index, 0) + 1
    assert max(per_pass.values()) <= 8
    assert len(per_pass) >= 50 // 8  # spread over passes, not one
    # the streams are served in the order their outputs came
    order = sorted(woken_in_pass, key=lambda seq_id: (woken_in_pass[seq_id], seq_id))
    assert order == [s.seq_id for s in streams]


async def test_outputs_of_one_sequence_keep_their_order_across_steps():
    registry = StreamRegistry(0.0)
    fanout = OutputFanout(registry, per_pass=1)
    first, second = registry.open(PROMPT, PARAMS), registry.open(PROMPT, PARAMS)
    fanout.deliver([output(first.seq_id, 1), output(second.seq_id, 1)])
    fanout.deliver([output(first.seq_id, 2), output(second.seq_id, 2, "length")])
    assert fanout.backlog == 3
    fanout.flush()
    assert fanout.backlog == 0
    assert (await first.__anext__()).token_ids == [1, 2]
    last = await second.__anext__()
    assert last.token_ids == [1, 2] and last.finish_reason == "length"


async def test_outputs_for_a_closed_stream_are_dropped():
    registry = StreamRegistry(0.0)
    fanout = OutputFanout(registry, per_pass=4)
    gone, kept = registry.open(PROMPT, PARAMS), registry.open(PROMPT, PARAMS)
    registry.close(gone)
    fanout.deliver([output(gone.seq_id, 1), output(kept.seq_id, 2)])
    assert fanout.backlog == 0
    assert (await kept.__anext__()).token_ids == [2]
    assert not gone.finished


class OneStepCore:
    """Delivers one step that finishes every submitted sequence, then stops (its step loop
    is gone), the way a worker that exits right after a step does."""

    max_model_len = 64
    supports_images = False
    stopped_reason = "the core stopped"

    def __init__(self, sequences: int) -> None:
        self._sequences = sequences

    async def run(self, outbox, deliver) -> None:
        seq_ids: list[int] = []
        while len(seq_ids) < self._sequences:
            await outbox.wait()
            seq_ids += [new.seq_id for new in outbox.take().adds]
        deliver(StepOutputs([output(seq_id, 7, "stop") for seq_id in seq_ids], IDLE_STATISTICS))


async def test_outputs_delivered_before_the_step_loop_stops_are_not_turned_into_aborts():
    """The last step's outputs are still queued in the fan-out when the core returns: every
    stream ends with the finish reason the step loop gave it, not with an abort."""
    sequences = 40
    results: dict[int, tuple[str | None, str | None]] = {}
    async with AsyncEngine.open(OneStepCore(sequences), fanout_per_pass=4) as engine:

        async def consume():
            async with engine.open_stream(PROMPT, PARAMS) as stream:
                deltas = [delta async for delta in stream]
                results[stream.seq_id] = (deltas[-1].finish_reason, stream.error)

        async with trio.open_nursery() as nursery:
            for _ in range(sequences):
                nursery.start_soon(consume)
    assert len(results) == sequences
    assert set(results.values()) == {("stop", None)}
