"""Sample a process tree's resident memory and CPU time (the process plus all its
descendants: a vlserve server's engine worker and prep processes count)."""

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


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by ``pid`` and its living descendants (and
    the children they have reaped); 0 if it is gone. Blocking, fast."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
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
