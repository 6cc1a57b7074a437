"""The framing between the front end and the engine worker: round trips, messages split
across reads, several messages in one read, and end of stream (no torch needed)."""

from __future__ import annotations

import socket

import trio
import trio.testing

from engine.core_messages import NewSequence, SequenceOutput, StepOutputs, Submit
from engine.outputs import TokenLogprob, TopLogprob
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.statistics import IDLE_STATISTICS
from engine.wire import HEADER, BlockingMessageSocket, Frames, MessageReceiver, encode

MESSAGES = [
    Submit(
        [NewSequence(3, EnginePrompt([1, 2, 3]), SamplingParams(max_tokens=5, stop=("x",)))],
        [1, 2],
    ),
    StepOutputs(
        [
            SequenceOutput(
                3,
                [7],
                "hi",
                [TokenLogprob(7, "hi", -0.5, [TopLogprob(7, "hi", -0.5)])],
                None,
            )
        ],
        IDLE_STATISTICS,
    ),
    StepOutputs([SequenceOutput(4, [], "", None, "abort", "boom")], IDLE_STATISTICS),
]


def same(a, b) -> bool:
    """Equality by value (``NewSequence`` compares by identity on purpose)."""
    return repr(a) == repr(b)


def test_encode_is_length_prefixed():
    data = encode(Submit())
    (size,) = HEADER.unpack_from(data)
    assert size == len(data) - HEADER.size


def test_frames_round_trip_fed_byte_by_byte():
    """A message split across many reads comes out once, whole, after its last byte."""
    frames = Frames()
    encoded = [encode(m) for m in MESSAGES]
    data = b"".join(encoded)
    boundaries = {sum(len(e) for e in encoded[: k + 1]) for k in range(len(encoded))}
    out = []
    for i in range(len(data)):
        frames.feed(data[i : i + 1])
        out.extend(frames.pop_all())
        assert len(out) == sum(1 for b in boundaries if b <= i + 1)
        assert frames.partial == (i + 1 not in boundaries)
    assert len(out) == len(MESSAGES)
    assert all(same(a, b) for a, b in zip(out, MESSAGES, strict=True))


def test_frames_several_messages_in_one_read():
    frames = Frames()
    data = b"".join(encode(m) for m in MESSAGES)
    frames.feed(data + encode(MESSAGES[0])[:5])  # plus the start of one more
    out = frames.pop_all()
    assert [type(m) for m in out] == [type(m) for m in MESSAGES]
    assert frames.partial and frames.pop_all() == []


async def test_message_receiver_reads_split_messages_then_none_at_end():
    send, receive = trio.testing.memory_stream_one_way_pair()
    receiver = MessageReceiver(receive)
    data = b"".join(encode(m) for m in MESSAGES)
    async with trio.open_nursery() as nursery:

        async def writer():
            for i in range(0, len(data), 7):  # 7-byte pieces: every header is split
                await send.send_all(data[i : i + 7])
                await trio.testing.wait_all_tasks_blocked()
            await send.aclose()

        nursery.start_soon(writer)
        got = [await receiver.receive() for _ in MESSAGES]
        assert await receiver.receive() is None
    assert all(same(a, b) for a, b in zip(got, MESSAGES, strict=True))


async def test_message_receiver_keeps_buffered_bytes_across_cancellation(
    autojump_clock,
):
    """Cancellation: a receive cancelled mid-message loses nothing; the next one completes it."""
    send, receive = trio.testing.memory_stream_one_way_pair()
    receiver = MessageReceiver(receive)
    data = encode(MESSAGES[1])
    await send.send_all(data[:10])
    with trio.move_on_after(1) as scope:  # the autojump clock makes this instant
        await receiver.receive()
    assert scope.cancelled_caught
    await send.send_all(data[10:])
    assert same(await receiver.receive(), MESSAGES[1])


def test_blocking_socket_round_trip_and_partial_messages():
    """The worker's end: a non-blocking receive returns nothing while nothing came, reads
    a message that has started arriving to its end, and sets ``closed`` at end of stream."""
    a, b = socket.socketpair()
    with a, b:
        worker = BlockingMessageSocket(b)
        assert worker.receive_all(block=False) == []
        assert not worker.readable()
        data = encode(MESSAGES[0]) + encode(MESSAGES[2])
        a.sendall(data[:3])  # a partial header: the rest follows before it blocks long
        a.sendall(data[3:])
        got = []
        while len(got) < 2:
            got.extend(worker.receive_all(block=True))
        assert all(same(x, y) for x, y in zip(got, [MESSAGES[0], MESSAGES[2]], strict=True))
        worker.send(MESSAGES[1])
        front = Frames()
        while not (messages := front.pop_all()):
            front.feed(a.recv(1 << 16))
        assert same(messages[0], MESSAGES[1])
        a.shutdown(socket.SHUT_WR)
        assert worker.receive_all(block=True) == []
        assert worker.closed
