"""One write per stream per engine step: events that are ready together leave together.

The response body (``server.sse.ProducedEventsBody``) is driven here both ways the server
sends it: as Quart iterates a body (``async with body: async for chunk in body: await
send(chunk)``, the producer in its own task), and inline (``send_body``: the producer in
the sending task, for one choice). Every chunk is one ASGI send and so one socket write.
A stand-in engine pushes tokens into real ``RequestStream``s, one step at a time, so the
counts below are exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from engine.core_messages import SequenceOutput
from engine.prompt import EnginePrompt
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams
from server.chat_format import ChatChunker
from server.generation import make_jobs
from server.response_meta import ResponseMeta
from server.sse import DONE, EventOutbox, ProducedEventsBody, send_body
from server.streaming import produce_chunks
from tests.server.sse_client import parse_events


class StepEngine:
    """``step()`` gives every open stream one token (``max_tokens`` ends it)."""

    def __init__(self) -> None:
        self.streams: list[tuple[RequestStream, SamplingParams]] = []
        self.produced: dict[int, int] = {}
        self.opened = trio.Event()
        self.aborted = 0

    @asynccontextmanager
    async def open_stream(
        self, prompt: EnginePrompt, params: SamplingParams, lease=None, *, final_only: bool = False
    ) -> AsyncIterator[RequestStream]:
        stream = RequestStream(len(self.streams), len(prompt.token_ids), wants_logprobs=False, final_only=final_only)
        self.streams.append((stream, params))
        self.produced[stream.seq_id] = 0
        self.opened.set()
        try:
            yield stream
        finally:
            if not stream.finished:
                self.aborted += 1

    def step(self, piece: str) -> None:
        for stream, params in self.streams:
            if stream.finished:
                continue
            self.produced[stream.seq_id] += 1
            finish = "length" if self.produced[stream.seq_id] >= params.max_tokens else None
            stream.push(SequenceOutput(stream.seq_id, [1], piece, None, finish))


def chat_body(engine: StepEngine, n: int, max_tokens: int, *, inline: bool = False) -> ProducedEventsBody:
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0)] * n
    jobs = make_jobs([EnginePrompt(token_ids=[5, 6])], [params])
    chunker = ChatChunker(ResponseMeta.new("chatcmpl", "m"), include_usage=True, logprobs=False)
    return ProducedEventsBody(partial(produce_chunks, engine, jobs, chunker, True), "req", inline=inline)


async def drive(engine: StepEngine, body: ProducedEventsBody, pieces: list[str]) -> list[bytes]:
    """Send ``body`` as the server does (``send_body``: inline if the body is, else as
    Quart's send loop iterates it), one engine step per piece once everything has
    settled; return the chunks written (one ASGI send, one write each)."""
    writes: list[bytes] = []

    async def write(chunk: bytes) -> None:
        writes.append(chunk)
        await trio.lowlevel.checkpoint()  # the socket write

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_body, body, write)
        await trio.testing.wait_all_tasks_blocked()
        for piece in pieces:
            engine.step(piece)
            await trio.testing.wait_all_tasks_blocked()
    return writes


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "producer-task"])
async def test_one_choice_one_write_per_step_and_the_end_in_the_last(inline):
    """A role write, then one write per step; the last step's write also holds the
    finish chunk, the usage chunk and [DONE]. The same bytes either way."""
    engine = StepEngine()
    body = chat_body(engine, n=1, max_tokens=3, inline=inline)
    writes = await drive(engine, body, ["a", "b", "c"])
    events = [parse_events(chunk.decode())[0] for chunk in writes]
    assert [len(e) for e in events] == [1, 1, 1, 3]
    assert [e[0]["choices"][0]["delta"] for e in events[1:]] == [{"content": p} for p in "abc"]
    assert events[3][1]["choices"][0]["finish_reason"] == "length"
    assert events[3][2]["usage"]["completion_tokens"] == 3
    assert writes[-1].endswith(DONE)
    if not inline:
        assert body.outbox.statistics().writes == 4
        assert body.outbox.statistics().events == 7


class TaskSteps(trio.abc.Instrument):
    """Task steps of every task but ``ignored`` (the test's own)."""

    def __init__(self, ignored: trio.lowlevel.Task) -> None:
        self.ignored = ignored
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.ignored:
            self.steps += 1


async def steps_per_delta(inline: bool, deltas: int = 39) -> float:
    engine = StepEngine()
    body = chat_body(engine, n=1, max_tokens=deltas + 1, inline=inline)
    counter = TaskSteps(trio.lowlevel.current_task())

    async def write(chunk: bytes) -> None:
        await trio.lowlevel.checkpoint()  # the socket write

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_body, body, write)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(counter)
        for _ in range(deltas):
            engine.step("x")
            await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.remove_instrument(counter)
        engine.step("x")
    return counter.steps / deltas


async def test_inline_saves_a_task_step_per_delta():
    """Inline, a delta costs two task steps (the consumer's wake-up, and its return from
    the write's checkpoint); with a producer task, one more (the hand-over to the send
    loop)."""
    inline = await steps_per_delta(inline=True)
    with_task = await steps_per_delta(inline=False)
    assert inline == 2
    assert with_task == 3


async def test_each_engine_step_is_one_write_for_all_choices():
    """Three choices, three steps: a role write holding the three role chunks, then one
    write per step holding every choice's content (the last one every finish chunk too);
    usage and [DONE] come last (in that write, or in one more when the choices' nursery
    closes after the send loop woke)."""
    engine = StepEngine()
    body = chat_body(engine, n=3, max_tokens=3)
    writes = await drive(engine, body, ["a", "b", "c"])
    events = [parse_events(chunk.decode())[0] for chunk in writes]
    tail = [event for chunk in events[4:] for event in chunk]
    events = events[:4]
    events[3], tail = events[3][:6], events[3][6:] + tail
    assert [len(e) for e in events] == [3, 3, 3, 6]
    assert all(e["choices"][0]["delta"] == {"role": "assistant", "content": ""} for e in events[0])
    for step, piece in enumerate(["a", "b", "c"], start=1):
        choices = [e["choices"][0] for e in events[step]]
        contents = sorted((c["index"], c["delta"]["content"]) for c in choices if c["delta"])
        assert contents == [(i, piece) for i in range(3)]
    finishes = sorted((c["index"], c["finish_reason"]) for e in events[3] for c in e["choices"] if not c["delta"])
    assert finishes == [(i, "length") for i in range(3)]
    assert len(tail) == 1 and tail[0]["usage"]["completion_tokens"] == 9
    assert writes[-1].endswith(DONE)
    assert len(writes) <= 5
    assert engine.aborted == 0


async def test_events_put_together_are_taken_as_one_chunk():
    outbox = EventOutbox()
    for event in [b"data: 1\n\n", b"data: 2\n\n", DONE]:
        outbox.put(event)
    outbox.close()
    assert await outbox.take() == b"data: 1\n\ndata: 2\n\n" + DONE
    assert outbox.statistics().events == 3 and outbox.statistics().writes == 1


async def test_a_slow_reader_holds_the_producer_at_the_high_water_mark():
    """With ``high_water`` bytes pending the producer waits; one take lets it go on."""
    outbox = EventOutbox(high_water=10)
    put: list[int] = []

    async def producer() -> None:
        for i in range(4):
            await outbox.wait_for_room()
            outbox.put(b"x" * 6)
            put.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert put == [0, 1]  # 12 bytes pending >= 10
        assert await outbox.take() == b"x" * 12
        await trio.testing.wait_all_tasks_blocked()
        assert put == [0, 1, 2, 3]


async def test_client_gone_cancels_an_inline_producer_and_aborts_the_sequence():
    """Invariant: cancelling the sending task while an inline producer waits for its next
    delta aborts the sequence; nothing is written after the cancel."""
    engine = StepEngine()
    body = chat_body(engine, n=1, max_tokens=100, inline=True)
    writes: list[bytes] = []

    async def write(chunk: bytes) -> None:
        writes.append(chunk)
        await trio.lowlevel.checkpoint()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body, body, write)
            await trio.testing.wait_all_tasks_blocked()
            engine.step("a")
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the client leaves after the first token's write
    assert engine.aborted == 1
    assert len(writes) == 2 and not writes[-1].endswith(DONE)


async def test_a_failing_inline_producer_ends_with_an_error_event_and_done():
    async def producer(out) -> None:
        await out.send({"x": 1})
        await out.flush()
        raise RuntimeError("boom")

    writes: list[bytes] = []

    async def write(chunk: bytes) -> None:
        writes.append(chunk)

    await send_body(ProducedEventsBody(producer, "req", inline=True), write)
    assert writes[0] == b'data: {"x":1}\n\n'
    events = parse_events(writes[1].decode())[0]
    assert events[0]["error"]["type"] == "server_error" and "boom" not in writes[1].decode()
    assert writes[1].endswith(DONE)


async def test_client_gone_cancels_the_producer_and_aborts_the_sequence():
    """Invariant: leaving the body (the send loop cancelled) aborts every sequence and
    leaves no producer running."""
    engine = StepEngine()
    body = chat_body(engine, n=2, max_tokens=100)
    with trio.CancelScope() as scope:
        async with body:
            async for _chunk in body:
                await trio.testing.wait_all_tasks_blocked()  # the choices' streams are open
                if engine.streams and engine.produced[0]:
                    scope.cancel()  # the client leaves after the first token's write
                else:
                    engine.step("a")
    assert engine.aborted == 2
    assert body.outbox.statistics().closed
