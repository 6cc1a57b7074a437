"""The engine worker's event loop (``engine.worker_loop.serve_steps``) over a socket pair,
with the step loop's fake core: steps run in a thread holding the device gate, the socket
is read meanwhile, and closing the front end's end stops it after the step in flight."""

from __future__ import annotations

import socket
import threading

import trio
import trio.testing

from engine.core_messages import StepOutputs, Submit
from engine.scheduler import Scheduler
from engine.step_loop import StepLoop
from engine.wire import MessageReceiver, encode
from engine.worker_loop import Inbox, serve_steps
from tests.engine.test_step_loop import FakeCore, make_loop, new


async def receive_until(receiver: MessageReceiver, done) -> list[StepOutputs]:
    messages: list[StepOutputs] = []
    while not done(messages):
        message = await receiver.receive()
        assert message is not None, "the worker closed its end"
        assert isinstance(message, StepOutputs)
        messages.append(message)
    return messages


def front_end(sock: socket.socket) -> tuple[trio.SocketStream, MessageReceiver]:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return stream, MessageReceiver(stream)


async def test_serves_what_arrives_and_returns_when_the_front_end_closes():
    """Outputs for every step until each sequence finishes, a statistics message after an
    abort that needed no step, and a clean return when the front end closes its end."""
    loop, _ = make_loop(max_num_seqs=1)
    inbox = Inbox()
    front_sock, worker_sock = socket.socketpair()
    stream, receiver = front_end(front_sock)
    returned = trio.Event()

    async def worker():
        await serve_steps(loop, worker_sock, inbox)
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await stream.send_all(encode(Submit([new(1, 3), new(2, 100)])))

        def finished_one(messages):
            return any(u.seq_id == 1 and u.finish_reason for m in messages for u in m.updates)

        messages = await receive_until(receiver, finished_one)
        assert [t for m in messages for u in m.updates if u.seq_id == 1 for t in u.token_ids] == [0, 1, 2]
        await stream.send_all(encode(Submit(aborts=[2])))
        idle = await receive_until(receiver, lambda ms: bool(ms) and ms[-1].stats.running == ms[-1].stats.waiting == 0)
        assert idle[-1].stats.cache_tokens == 0
        await stream.aclose()
        with trio.fail_after(10):
            await returned.wait()
    worker_sock.close()


async def test_returns_at_once_if_the_front_end_has_already_closed():
    loop, core = make_loop()
    front_sock, worker_sock = socket.socketpair()
    front_sock.close()
    with trio.fail_after(10), worker_sock:
        await serve_steps(loop, worker_sock, Inbox())
    assert core.plans == []


class HeldCore(FakeCore):
    """A fake core whose second step blocks its thread until ``release`` is set, and
    records, from inside that step, the gate's borrower and what ``has_news`` says."""

    def __init__(self, gate: trio.CapacityLimiter, has_news) -> None:
        super().__init__()
        self.gate = gate
        self.has_news = has_news
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[tuple[int, bool]] = []
        self.finished_steps = 0

    def execute(self, plan):
        if len(self.plans) == 1:
            self.entered.set()
            assert self.release.wait(10)
            self.seen.append((self.gate.borrowed_tokens, self.has_news()))
        report = super().execute(plan)
        self.finished_steps += 1
        return report


def held_worker():
    """A device gate, inbox, ``HeldCore`` and step loop wired as ``engine.worker_main`` does,
    and a socket pair (front end, worker)."""
    gate = trio.CapacityLimiter(1)
    inbox = Inbox()
    core = HeldCore(gate, inbox.__bool__)
    loop = StepLoop(core, Scheduler(max_num_seqs=8, max_num_batched_tokens=100))
    return gate, inbox, core, loop, socket.socketpair()


async def test_a_step_holds_the_gate_in_its_thread_and_what_arrives_meanwhile_is_taken_in():
    """While a step runs (in a thread, holding the one device-gate token), the event loop
    reads a submit sent meanwhile: the step sees ``has_news`` (so a run of decode sub-steps
    would end), and the abort it carries applies at the very next step."""
    gate, inbox, core, loop, (front_sock, worker_sock) = held_worker()
    stream, receiver = front_end(front_sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_steps, loop, worker_sock, inbox, gate)
        await stream.send_all(encode(Submit([new(1, 50), new(2, 50)])))
        await trio.to_thread.run_sync(core.entered.wait)
        assert gate.borrowed_tokens == 1  # held by the step's thread, not the event loop
        await stream.send_all(encode(Submit(aborts=[1])))
        with trio.fail_after(10):
            while not inbox:
                await trio.sleep(0.001)
        core.release.set()
        after = await receive_until(receiver, lambda ms: any(1 in [s.seq_id for s in p.leaving] for p in core.plans))
        assert after
        assert core.seen == [(1, True)]
        leaving_step = next(i for i, p in enumerate(core.plans) if any(s.seq_id == 1 for s in p.leaving))
        assert leaving_step == 2  # the step right after the held one
        nursery.cancel_scope.cancel()
    worker_sock.close()
    front_sock.close()


async def test_closing_during_a_step_lets_the_step_finish_then_returns():
    """The front end closes while a step runs: the step's thread is not abandoned (it
    finishes, and the gate is free again), then ``serve_steps`` returns."""
    gate, inbox, core, loop, (front_sock, worker_sock) = held_worker()
    stream, _ = front_end(front_sock)
    returned = trio.Event()

    async def worker():
        await serve_steps(loop, worker_sock, inbox, gate)
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await stream.send_all(encode(Submit([new(1, 50)])))
        await trio.to_thread.run_sync(core.entered.wait)
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert not returned.is_set()  # waiting for the step, not abandoning it
        core.release.set()
        with trio.fail_after(10):
            await returned.wait()
    assert core.finished_steps == 2 and gate.borrowed_tokens == 0
    worker_sock.close()


class CountingCore(FakeCore):
    """A fake core that counts its finished steps under a condition the test can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Condition()
        self.steps = 0

    def execute(self, plan):
        report = super().execute(plan)
        with self.done:
            self.steps += 1
            self.done.notify_all()
        return report


async def test_steps_run_back_to_back_without_the_event_loop_and_their_outputs_arrive_in_order():
    """Once a sequence is taken in, the step thread runs its steps one after another and
    writes each step's outputs itself: all 20 steps finish while the worker's event loop is
    held up (a step that needed a round trip through the loop would wait for it), and the
    front end then reads 20 outputs, tokens in order."""
    core = CountingCore()
    loop = StepLoop(core, Scheduler(max_num_seqs=8, max_num_batched_tokens=100))
    inbox = Inbox()
    front_sock, worker_sock = socket.socketpair()
    stream, receiver = front_end(front_sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_steps, loop, worker_sock, inbox)
        await stream.send_all(encode(Submit([new(1, 20)])))
        with trio.fail_after(10):
            while core.steps == 0:
                await trio.sleep(0.001)
        with core.done:  # holds up this event loop (the worker's too: it is the same one)
            assert core.done.wait_for(lambda: core.steps >= 20, timeout=10), core.steps
        messages = await receive_until(receiver, lambda ms: any(u.finish_reason for m in ms for u in m.updates))
        assert [t for m in messages for u in m.updates for t in u.token_ids] == list(range(20))
        assert len([m for m in messages if m.updates]) == 20
        nursery.cancel_scope.cancel()
    worker_sock.close()
    front_sock.close()
