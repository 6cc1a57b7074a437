"""The engine's front end (``AsyncEngine``) over a scripted core: what it sends, what it
delivers, and what happens when the core goes away. No model, no threads; ordering is
driven by ``wait_all_tasks_blocked`` and the autojump clock, never by real sleeps."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from engine import async_engine
from engine.async_engine import AsyncEngine
from engine.core_messages import SequenceOutput, StepOutputs, Submit
from engine.errors import RequestRejected
from engine.outbox import Outbox
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.statistics import IDLE_STATISTICS

PROMPT = EnginePrompt([1, 2, 3])


class ScriptedCore:
    """Takes the outbox once ``taking`` is set; delivers what the test sends; stops on ``stop``."""

    max_model_len = 64
    supports_images = False
    stopped_reason = "the scripted core stopped"

    def __init__(self) -> None:
        self.submits: list[Submit] = []
        self.taking = trio.Event()
        self.stop = trio.Event()
        self._send, self._receive = trio.open_memory_channel[StepOutputs](16)

    def emit(self, *updates: SequenceOutput) -> None:
        self._send.send_nowait(StepOutputs(list(updates), IDLE_STATISTICS))

    async def run(self, outbox: Outbox, deliver) -> None:
        async with trio.open_nursery() as nursery:

            async def take():
                await self.taking.wait()
                while True:
                    await outbox.wait()
                    self.submits.append(outbox.take())

            async def feed():
                async for outputs in self._receive:
                    deliver(outputs)

            nursery.start_soon(take)
            nursery.start_soon(feed)
            await self.stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def aborted(self) -> list[int]:
        return [seq_id for submit in self.submits for seq_id in submit.aborts]

    @property
    def added(self) -> list[int]:
        return [new.seq_id for submit in self.submits for new in submit.adds]


async def test_outputs_reach_their_stream_as_deltas():
    core = ScriptedCore()
    core.taking.set()
    async with (
        AsyncEngine.open(core) as engine,
        engine.open_stream(PROMPT, SamplingParams(max_tokens=3)) as stream,
    ):
        await trio.testing.wait_all_tasks_blocked()
        assert core.added == [stream.seq_id]
        core.emit(SequenceOutput(stream.seq_id, [7, 8], "hi", None, None))
        core.emit(SequenceOutput(stream.seq_id, [9], "!", None, "length"))
        deltas = [delta async for delta in stream]
    assert "".join(d.text for d in deltas) == "hi!"
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3
    assert deltas[-1].prompt_tokens == 3
    assert core.aborted == []  # it finished: nothing to abort


async def test_leaving_before_the_end_sends_an_abort_once_sent():
    """Invariant: a consumer that leaves a running sequence early makes the front end send
    exactly one abort for it, and its later outputs are dropped."""
    core = ScriptedCore()
    core.taking.set()
    async with AsyncEngine.open(core) as engine:
        async with engine.open_stream(PROMPT, SamplingParams(max_tokens=50)) as stream:
            await trio.testing.wait_all_tasks_blocked()
            core.emit(SequenceOutput(stream.seq_id, [1], "a", None, None))
            await stream.__anext__()
        await trio.testing.wait_all_tasks_blocked()
        assert core.aborted == [stream.seq_id]
        core.emit(SequenceOutput(stream.seq_id, [2], "b", None, None))  # in flight: dropped
        await trio.testing.wait_all_tasks_blocked()
        assert engine.is_healthy()


async def test_a_sequence_left_before_it_was_sent_is_never_sent():
    core = ScriptedCore()
    async with AsyncEngine.open(core) as engine:
        async with engine.open_stream(PROMPT, SamplingParams()):
            assert engine.statistics().waiting == 1  # counted while still in the outbox
        assert engine.statistics().waiting == 0
        core.taking.set()
        await trio.testing.wait_all_tasks_blocked()
    assert core.added == [] and core.aborted == []


async def test_a_core_that_stops_fails_open_streams_and_health():
    """If the core goes away, every open stream ends with ``abort`` and the core's reason,
    ``is_healthy()`` turns false, and new streams are refused."""
    core = ScriptedCore()
    core.taking.set()
    async with AsyncEngine.open(core) as engine:
        async with engine.open_stream(PROMPT, SamplingParams(max_tokens=50)) as stream:
            core.stop.set()
            with trio.fail_after(1):
                deltas = [delta async for delta in stream]
            assert deltas[-1].finish_reason == "abort"
            assert stream.error == core.stopped_reason
        assert not engine.is_healthy()
        with pytest.raises(RuntimeError):
            async with engine.open_stream(PROMPT, SamplingParams()):
                pass


async def test_closing_the_engine_ends_streams_with_abort():
    core = ScriptedCore()
    core.taking.set()
    outcome = {}
    async with trio.open_nursery() as nursery, AsyncEngine.open(core) as engine:

        async def consumer(task_status=trio.TASK_STATUS_IGNORED):
            async with engine.open_stream(PROMPT, SamplingParams(max_tokens=50)) as stream:
                task_status.started()
                outcome["deltas"] = [delta async for delta in stream]
                outcome["error"] = stream.error

        await nursery.start(consumer)
    assert outcome["deltas"][-1].finish_reason == "abort"
    assert "stopped" in outcome["error"]


async def test_refusals_come_before_anything_is_queued():
    core = ScriptedCore()
    core.taking.set()
    async with AsyncEngine.open(core) as engine:
        with pytest.raises(RequestRejected) as info:
            async with engine.open_stream(PROMPT, SamplingParams(max_tokens=62)):
                pass
        assert (info.value.kind, info.value.subject) == (
            "context_length_exceeded",
            "max_tokens",
        )
        with pytest.raises(RequestRejected) as info:
            async with engine.open_stream(EnginePrompt([]), SamplingParams()):
                pass
        assert info.value.kind == "empty_prompt"
        await trio.testing.wait_all_tasks_blocked()
        assert core.submits == []


async def test_a_stall_counts_from_when_work_arrived(monkeypatch):
    """``is_healthy()``: a long idle time is no stall; work without progress for
    ``STALL_SECONDS`` is; any delivered output ends the stall."""
    now = [1000.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(async_engine, "time", Clock)
    core = ScriptedCore()
    core.taking.set()
    async with AsyncEngine.open(core) as engine:
        now[0] += 10 * async_engine.STALL_SECONDS  # idle for a long time
        async with engine.open_stream(PROMPT, SamplingParams(max_tokens=50)) as stream:
            assert engine.is_healthy()
            now[0] += async_engine.STALL_SECONDS + 1
            assert not engine.is_healthy()
            core.emit(SequenceOutput(stream.seq_id, [1], "a", None, None))
            await trio.testing.wait_all_tasks_blocked()
            assert engine.is_healthy()
