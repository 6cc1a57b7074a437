"""Sample a process tree's resident memory and CPU time (the process plus all its
descendants: a vlserve server's engine worker and prep processes count)."""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import trio

# Seconds between two PSS readings of the tree (RSS is read every sampling interval).
PSS_INTERVAL_S = 1.0


# The parts of a server's process tree whose CPU the benchmark reports apart: vlserve's
# server process (HTTP, streaming, the engine front end), its engine worker, and the rest
# of its descendants (the prep processes). A baseline is one process: all "front end".
CPU_ROLES = ("front end", "engine", "prep")


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants now; empty if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """``measure(p)`` summed over ``pid`` and its descendants now; 0 if it is gone. A
    process that exits between listing and reading (or cannot be measured) counts 0."""
    total = 0
    for proc in _tree(pid):
        try:
            total += measure(proc)
        except (psutil.Error, AttributeError):
            pass
    return total


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and its descendants now; 0 if it is gone. Blocking, fast.
    Pages shared between the processes (torch's libraries, mapped by each) count once per
    process: see ``tree_pss``."""
    return int(_tree_sum(pid, lambda p: p.memory_info().rss))


def tree_pss(pid: int) -> int:
    """The proportional set size of ``pid`` and its descendants now (each shared page split
    among the processes mapping it): what the tree costs the machine. 0 if it is gone.
    Blocking; reads each process's smaps (about a millisecond each)."""
    return int(_tree_sum(pid, lambda p: p.memory_full_info().pss))


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by ``pid`` and its living descendants (and
    the children they have reaped); 0 if it is gone. Blocking, fast."""
    return float(_tree_sum(pid, _cpu_seconds))


def cpu_role(proc: psutil.Process, root_pid: int) -> str:
    """Which of ``CPU_ROLES`` a process of ``root_pid``'s tree is: the root itself, an
    engine worker (``python -m engine.worker_main``), or another descendant. Raises
    ``psutil.Error`` if it cannot be read."""
    if proc.pid == root_pid:
        return "front end"
    return "engine" if "engine.worker_main" in proc.cmdline() else "prep"


def tree_cpu_seconds_by_role(pid: int) -> dict[str, float]:
    """As ``tree_cpu_seconds``, per ``cpu_role`` (a role with no process is absent; what
    the root's reaped children used counts as the root's); empty if ``pid`` is gone.
    Blocking, fast (reads each process's command line once)."""
    seconds: dict[str, float] = {}
    for proc in _tree(pid):
        try:
            role = cpu_role(proc, pid)
            seconds[role] = seconds.get(role, 0.0) + _cpu_seconds(proc)
        except psutil.Error:
            pass  # exited meanwhile
    return seconds


async def _read(measure: Callable[[int], int], pid: int) -> int:
    """``measure(pid)`` in a worker thread. Cancellation: waits for the thread."""
    return await trio.to_thread.run_sync(measure, pid)


async def sample_rss(
    pid: int,
    interval: float,
    samples: list[tuple[float, int]],
    pss_samples: list[tuple[float, int]] | None = None,
    *,
    pss_interval: float = PSS_INTERVAL_S,
) -> None:
    """Append ``(time.monotonic(), bytes)`` every ``interval`` seconds until cancelled (and
    the tree's PSS to ``pss_samples``, if given, every ``pss_interval`` seconds: reading
    every process's smaps costs the load generator about 2 ms of CPU per process, so at
    the RSS interval it would tax a server of several processes more than one of one).

    Each reading runs in a worker thread (``/proc`` reads), so the event loop never waits
    on it. Cancellation: returns at the next boundary; a reading in its thread finishes first.
    """
    due = trio.current_time()
    pss_due = due
    while True:
        rss = await _read(tree_rss, pid)
        samples.append((time.monotonic(), rss))
        if pss_samples is not None and trio.current_time() >= pss_due:
            pss_samples.append((time.monotonic(), await _read(tree_pss, pid)))
            pss_due += pss_interval
        due = max(due + interval, trio.current_time())
        await trio.sleep_until(due)
