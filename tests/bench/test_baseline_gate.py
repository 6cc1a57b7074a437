"""The pr-style baseline's gate keeps PR #4570's promise: a cancelled caller holds the lock
until its executor work has ended, so no second job starts beside it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.baselines.executor_gate import run_gated


def test_cancelled_caller_keeps_the_lock_until_its_work_ends():
    async def scenario() -> list[str]:
        lock = asyncio.Lock()
        started, release = threading.Event(), threading.Event()
        log: list[str] = []

        def slow() -> str:
            started.set()
            release.wait(5)
            log.append("slow done")
            return "slow"

        def quick() -> str:
            log.append("quick ran")
            return "quick"

        with ThreadPoolExecutor(max_workers=2) as pool:
            first = asyncio.create_task(run_gated(lock, pool, slow))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
            second = asyncio.create_task(run_gated(lock, pool, quick))
            first.cancel()
            await asyncio.sleep(0.05)
            assert lock.locked() and not first.done() and log == []  # still held while slow() runs
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert await second == "quick"
        return log

    assert asyncio.run(scenario()) == ["slow done", "quick ran"]


def test_a_caller_cancelled_while_waiting_never_runs_its_work():
    async def scenario() -> list[str]:
        lock = asyncio.Lock()
        ran: list[str] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            await lock.acquire()
            waiter = asyncio.create_task(run_gated(lock, pool, ran.append, "x"))
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            lock.release()
            await run_gated(lock, pool, ran.append, "y")
        return ran

    assert asyncio.run(scenario()) == ["y"]
