"""Cancellation invariants of the CPU gates (real worker threads, work blocked on events)."""

from __future__ import annotations

import functools
import threading

import trio
import trio.lowlevel
import trio.testing

from vl.gates import BorrowTimes, Gate


async def wait_for_thread_event(event: threading.Event) -> None:
    await trio.to_thread.run_sync(event.wait)


async def test_cancelled_requester_keeps_token_until_its_thread_returns():
    """Invariant: a requester cancelled while its thread runs keeps the gate's token until
    the thread returns; only then is it cancelled (at its next checkpoint), and the gate
    is full again."""
    gate = Gate("prep", 1)
    started, release = threading.Event(), threading.Event()
    finished = trio.Event()

    def work():
        started.set()
        release.wait(10)
        return "done"

    async def requester(scope_box):
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            await gate.run(work)
            finished.set()
            await trio.lowlevel.checkpoint()
            scope_box.append("not cancelled")

    try:
        async with trio.open_nursery() as nursery:
            box = []
            nursery.start_soon(requester, box)
            await wait_for_thread_event(started)
            box[0].cancel()
            await trio.sleep(0.05)
            assert not finished.is_set()  # still waiting for its thread
            assert gate.statistics().borrowed == 1
            release.set()
            await finished.wait()
    finally:
        release.set()
    assert box[0].cancelled_caught
    assert "not cancelled" not in box
    assert gate.statistics().borrowed == 0


async def test_cancelled_waiters_never_start_their_work():
    """Invariant (no backlog): with a gate of 1 held by running work, 100 waiters that are
    then cancelled never start their work; afterwards the gate is full and idle."""
    gate = Gate("prep", 1)
    started, release = threading.Event(), threading.Event()
    ran = []

    def blocker():
        started.set()
        release.wait(10)

    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(gate.run, blocker)
            await wait_for_thread_event(started)
            async with trio.open_nursery() as waiters:
                for i in range(100):
                    waiters.start_soon(gate.run, ran.append, i)
                await trio.testing.wait_all_tasks_blocked()
                assert gate.statistics().waiting == 100
                waiters.cancel_scope.cancel()
            release.set()
    finally:
        release.set()
    assert ran == []
    stats = gate.statistics()
    assert (stats.borrowed, stats.waiting) == (0, 0)


async def test_gate_bounds_concurrency():
    """Borrowed tokens equal threads running under the gate and never exceed its size."""
    gate = Gate("prep", 2)
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def work():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        threading.Event().wait(0.01)
        with lock:
            running[0] -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(gate.run, work)
    assert peak[0] == 2
    assert gate.statistics().completed == 10


async def test_borrow_times_record_the_wait_for_the_token_and_how_long_it_was_held(autojump_clock):
    """A call that waits 5 s (mock clock) for a token held elsewhere, then whose thread
    runs while 2 s pass, reports waited 5 and held 2; the gate's count is unchanged."""
    gate = Gate("prep", 1)
    holder = object()
    await gate.limiter.acquire_on_behalf_of(holder)
    times = BorrowTimes()
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(gate.run, release.wait, 10, times=times))
        await trio.sleep(5)
        assert times.asked is not None and times.acquired is None and times.waited is None
        gate.limiter.release_on_behalf_of(holder)
        await trio.sleep(2)  # the call's thread runs, holding the token
        release.set()
    assert times.waited == 5.0
    assert times.held == 2.0
    assert gate.statistics().completed == 1 and gate.statistics().borrowed == 0
