"""Sample a process tree's resident memory (the process plus all its descendants)."""

from __future__ import annotations

import time

import psutil
import trio


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and its descendants now; 0 if it is gone. Blocking, fast."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return total


async def sample_rss(pid: int, interval: float, samples: list[tuple[float, int]]) -> None:
    """Append ``(time.monotonic(), bytes)`` every ``interval`` seconds until cancelled.

    Each reading runs in a worker thread (``/proc`` reads), so the event loop never waits
    on it. Cancellation: returns at the next boundary; a reading in its thread finishes first.
    """
    due = trio.current_time()
    while True:
        rss = await trio.to_thread.run_sync(tree_rss, pid)
        samples.append((time.monotonic(), rss))
        due = max(due + interval, trio.current_time())
        await trio.sleep_until(due)
