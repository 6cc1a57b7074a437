"""Chat templates rendered in batches (``vl.render_batcher.RenderBatcher``): chats that
wait together go through the tokenizer gate in one call, each gets its own outcome, and
cancellation follows the component's rules (queued: withdrawn; in a running batch: the
batch runs on, owned by the batcher)."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from vl.chat_messages import TemplateMessages
from vl.errors import InvalidRequest, prep_process_died
from vl.gates import BorrowTimes, Gate
from vl.prep_tools import RenderChats, ThreadPrep
from vl.render_batcher import RenderBatcher


def chat(text: str) -> TemplateMessages:
    return TemplateMessages([{"role": "user", "content": text}])


class HeldTools:
    """Stands in for ``PrepTools``: a chat's token ids are the code points of its text; the
    text ``"bad"`` is rejected as a template would. While ``hold`` is set, the first chat
    of a call waits in its thread (on ``release``) after saying so (``entered``)."""

    def __init__(self) -> None:
        self.rendered: list[str] = []
        self.calls: list[int] = []
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def render_and_tokenize(self, messages, tools=None) -> list[int]:
        text = messages[0]["content"]
        if self.hold and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        self.rendered.append(text)
        if text == "bad":
            raise InvalidRequest("the template rejected this", param="messages", code="template_error")
        return [ord(c) for c in text]


class CountingRunner(ThreadPrep):
    """``ThreadPrep`` that records how many chats each ``RenderChats`` call carried, or
    fails every call with ``failure`` while it is set."""

    def __init__(self, tools: HeldTools) -> None:
        super().__init__(tools)
        self.failure: Exception | None = None

    async def run(self, gate, step, times=None):
        assert isinstance(step, RenderChats)
        self.tools.calls.append(len(step.chats))
        if self.failure is not None:
            raise self.failure
        return await super().run(gate, step, times)


async def render_all(batcher: RenderBatcher, texts: list[str], results: dict, nursery) -> None:
    async def one(text: str) -> None:
        try:
            results[text] = await batcher.render(chat(text))
        except InvalidRequest as exc:
            results[text] = exc

    for text in texts:
        nursery.start_soon(one, text)


async def test_chats_that_wait_together_go_in_one_call_each_with_its_own_outcome():
    """One chat starts a call; the seven that arrive while it runs (one of them rejected by
    the template) go together in the next: two calls, every chat its own token ids, the
    rejected one its own ``InvalidRequest``, and the gate is held by one call at a time."""
    tools = HeldTools()
    tools.hold = True
    runner, gate = CountingRunner(tools), Gate("tokenizer", 1)
    results: dict = {}
    later = ["b", "cc", "bad", "dd", "e", "ff", "g"]
    async with RenderBatcher.open(runner, gate) as batcher, trio.open_nursery() as nursery:
        await render_all(batcher, ["a"], results, nursery)
        await trio.to_thread.run_sync(tools.entered.wait)
        assert gate.statistics().borrowed == 1
        await render_all(batcher, later, results, nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.queued == len(later)
        tools.release.set()
    assert tools.calls == [1, 7]
    assert (batcher.batches, batcher.chats) == (2, 8)
    for text in ["a", *later]:
        if text == "bad":
            assert isinstance(results[text], InvalidRequest) and results[text].code == "template_error"
        else:
            assert results[text] == [ord(c) for c in text]
    assert gate.statistics().borrowed == 0


async def test_a_batch_holds_at_most_max_batch_chats():
    tools = HeldTools()
    tools.hold = True
    runner, gate = CountingRunner(tools), Gate("tokenizer", 1)
    results: dict = {}
    async with RenderBatcher.open(runner, gate, max_batch=4) as batcher, trio.open_nursery() as nursery:
        await render_all(batcher, ["first"], results, nursery)
        await trio.to_thread.run_sync(tools.entered.wait)
        await render_all(batcher, [f"chat {i}" for i in range(10)], results, nursery)
        await trio.testing.wait_all_tasks_blocked()
        tools.release.set()
    assert tools.calls == [1, 4, 4, 2]
    assert len(results) == 11


async def test_cancelled_while_queued_is_never_rendered_and_cancelled_in_a_batch_leaves_it_running():
    """Invariant: a chat whose caller is cancelled while it waits in the queue is never
    rendered; a caller cancelled while its batch runs returns at once, the batch finishes
    (the other chats in it get their outcomes) and its gate token comes back."""
    tools = HeldTools()
    tools.hold = True
    runner, gate = CountingRunner(tools), Gate("tokenizer", 1)
    results: dict = {}
    async with RenderBatcher.open(runner, gate) as batcher, trio.open_nursery() as nursery:
        in_batch = trio.CancelScope()
        queued = trio.CancelScope()

        async def render_under(scope: trio.CancelScope, text: str) -> None:
            with scope:
                results[text] = await batcher.render(chat(text))

        nursery.start_soon(render_under, in_batch, "running")
        await trio.to_thread.run_sync(tools.entered.wait)
        nursery.start_soon(render_under, queued, "withdrawn")
        await render_all(batcher, ["stays"], results, nursery)
        await trio.testing.wait_all_tasks_blocked()
        in_batch.cancel()
        queued.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert in_batch.cancelled_caught and queued.cancelled_caught  # both left while the call runs
        assert gate.statistics().borrowed == 1
        tools.release.set()
    assert "withdrawn" not in tools.rendered
    assert tools.rendered == ["running", "stays"]
    assert results == {"stays": [ord(c) for c in "stays"]}
    assert gate.statistics().borrowed == 0


async def test_a_failed_call_fails_every_chat_of_its_batch_and_the_next_batch_works():
    tools = HeldTools()
    runner, gate = CountingRunner(tools), Gate("tokenizer", 1)
    runner.failure = prep_process_died(-9)
    async with RenderBatcher.open(runner, gate) as batcher:
        with pytest.raises(type(runner.failure)):
            await batcher.render(chat("lost"))
        runner.failure = None
        assert await batcher.render(chat("ok")) == [ord("o"), ord("k")]


async def test_times_say_when_a_chat_was_queued_and_when_its_batch_held_the_gate(autojump_clock):
    class SlowRunner:
        async def run(self, gate, step, times):
            times.asked = trio.current_time()
            await trio.sleep(1.0)  # waiting for the gate
            times.acquired = trio.current_time()
            await trio.sleep(0.5)
            times.released = trio.current_time()
            return [[len(m)] for m in step.chats]

    gate = Gate("tokenizer", 1)
    async with RenderBatcher.open(SlowRunner(), gate) as batcher:
        times = BorrowTimes()
        assert await batcher.render(chat("x"), times) == [1]
    assert (times.waited, times.held) == (1.0, 0.5)


async def test_closing_fails_the_chats_still_queued():
    """Leaving ``open`` while chats wait (their batch task cannot take them: the one gate
    token is held elsewhere) ends each with ``RuntimeError`` instead of leaving it hanging,
    and a chat sent after closing gets the same error at once."""
    tools = HeldTools()
    gate = Gate("tokenizer", 1)
    outcomes: list = []

    async def render_one(batcher: RenderBatcher) -> None:
        try:
            await batcher.render(chat("late"))
        except RuntimeError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as outer:
        async with gate.limiter:  # the gate is busy with other work the whole time
            async with RenderBatcher.open(CountingRunner(tools), gate) as batcher:
                outer.start_soon(render_one, batcher)
                await trio.testing.wait_all_tasks_blocked()
    assert len(outcomes) == 1 and "stopped" in str(outcomes[0])
    assert tools.rendered == []
    with trio.fail_after(5), pytest.raises(RuntimeError, match="stopped"):
        await batcher.render(chat("after close"))  # refused at once, not queued for nobody
    assert batcher.queued == 0 and tools.rendered == []
