"""The front end's registry of open streams, and its outbox of adds and aborts."""

from __future__ import annotations

import random

import trio
import trio.testing

from engine.core_messages import NewSequence, SequenceOutput
from engine.outbox import Outbox
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.stream_registry import StreamRegistry

PROMPT = EnginePrompt([5, 6, 7])


def test_streams_get_unique_ids_and_the_prompt_length():
    registry = StreamRegistry(0.0)
    streams = [registry.open(PROMPT, SamplingParams()) for _ in range(5)]
    assert len({s.seq_id for s in streams}) == 5
    assert all(s.prompt_len == 3 for s in streams)
    assert len(registry) == 5 and registry.get(streams[2].seq_id) is streams[2]


def test_ids_are_per_registry():
    """No module-level counter: two engines number their sequences independently."""
    a, b = StreamRegistry(0.0), StreamRegistry(0.0)
    assert a.open(PROMPT, SamplingParams()).seq_id == b.open(PROMPT, SamplingParams()).seq_id


def test_close_forgets_and_open_streams_is_a_snapshot():
    registry = StreamRegistry(0.0)
    one, two = (
        registry.open(PROMPT, SamplingParams()),
        registry.open(PROMPT, SamplingParams()),
    )
    snapshot = registry.open_streams()
    for stream in snapshot:  # closing while iterating the snapshot is safe
        registry.close(stream)
    assert snapshot == [one, two]
    assert len(registry) == 0 and registry.get(one.seq_id) is None
    registry.close(one)  # closing twice is harmless


async def test_streams_take_the_interval_and_only_ask_for_logprobs_when_requested(
    autojump_clock,
):
    """With an interval, deltas after the first are at least that far apart; logprobs are
    ``None`` unless the params asked for them."""
    registry = StreamRegistry(0.5, random.Random(0))
    plain = registry.open(PROMPT, SamplingParams())
    with_logprobs = registry.open(PROMPT, SamplingParams(logprobs=0))
    plain.push(SequenceOutput(plain.seq_id, [1], "a", None, None))
    first = await plain.__anext__()
    start = trio.current_time()
    plain.push(SequenceOutput(plain.seq_id, [2], "b", None, None))
    plain.push(SequenceOutput(plain.seq_id, [3], "c", None, None))
    second = await plain.__anext__()
    assert trio.current_time() - start >= 0.5
    assert (first.text, second.text, second.token_ids, second.logprobs) == (
        "a",
        "bc",
        [2, 3],
        None,
    )
    with_logprobs.push(SequenceOutput(with_logprobs.seq_id, [1], "a", [], "stop"))
    assert (await with_logprobs.__anext__()).logprobs == []


def new(seq_id: int) -> NewSequence:
    return NewSequence(seq_id, PROMPT, SamplingParams())


def test_outbox_withdraws_an_add_not_yet_taken():
    """An abort of a sequence never sent removes it: the step loop never sees it."""
    outbox = Outbox()
    a, b = new(1), new(2)
    outbox.add(a)
    outbox.add(b)
    outbox.abort(a)
    submit = outbox.take()
    assert submit.adds == [b] and submit.aborts == []
    assert not outbox and outbox.pending_adds == 0


def test_outbox_sends_an_abort_for_an_add_already_taken():
    outbox = Outbox()
    a = new(1)
    outbox.add(a)
    assert outbox.take().adds == [a]
    outbox.abort(a)
    assert outbox
    assert outbox.take().aborts == [1]


async def test_outbox_wait_returns_once_something_is_pending():
    outbox = Outbox()
    woke = trio.Event()

    async def waiter():
        await outbox.wait()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        outbox.add(new(1))
        await trio.testing.wait_all_tasks_blocked()
        assert woke.is_set()
    with trio.fail_after(1):
        await outbox.wait()  # something is pending: returns at once
