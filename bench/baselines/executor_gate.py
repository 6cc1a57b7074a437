"""PR #4570's gate: an ``asyncio.Lock`` held around executor work until the work ends.

``run_gated`` is the PR's ``await_executor_future``: it submits ``fn`` to ``executor`` while
holding ``lock`` and awaits it through ``asyncio.shield``, so cancelling the caller does not
release the lock while the thread is still running ``fn`` (which would let the next caller
submit more work and rebuild the backlog the lock exists to prevent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


async def run_gated(lock: asyncio.Lock, executor: Executor | None, fn: Callable[..., T], *args) -> T:
    """Run ``fn(*args)`` in ``executor`` (``None``: the default pool) while holding ``lock``.

    Cancellation: waiting for the lock, the call is cancelled at once and ``fn`` never runs.
    Once submitted, a cancellation is remembered, the lock is kept until ``fn`` has
    returned, and only then is ``CancelledError`` raised (``fn``'s result is dropped).
    """
    loop = asyncio.get_running_loop()
    async with lock:
        future = loop.run_in_executor(executor, fn, *args)
        cancelled: asyncio.CancelledError | None = None
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError as exc:
                cancelled = exc
        if cancelled is not None:
            raise cancelled
        return future.result()
