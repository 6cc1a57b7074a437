"""How much CPU *other* processes used: the benchmark's measure of a noisy machine.

On a shared 2-core machine a test suite running beside the benchmark changes every
figure. ``CpuAccount`` counts, between ``start()`` and ``stop()``, the CPU seconds the
whole machine was busy minus those of this process and all its descendants (the server
under test, the image server and the probe included), as a share of the machine's capacity.
"""

from __future__ import annotations

import os
import time

import psutil


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_cpu() -> float:
    me = psutil.Process(os.getpid())
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass  # exited meanwhile
    return total


class CpuAccount:
    """Blocking but quick (reads ``/proc``); call from a worker thread inside an event loop."""

    def __init__(self) -> None:
        self._start = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), _machine_busy(), _own_cpu())

    def foreign_share(self) -> float:
        """Other processes' CPU use since ``start()``, as a fraction of all cores (0..1)."""
        t0, busy0, own0 = self._start
        wall = max(time.monotonic() - t0, 1e-6)
        foreign = (_machine_busy() - busy0) - (_own_cpu() - own0)
        return max(0.0, foreign / (wall * (psutil.cpu_count() or 1)))


def foreign_load_now(window: float = 1.0) -> float:
    """Other processes' CPU share over the next ``window`` seconds (blocks that long)."""
    account = CpuAccount()
    account.start()
    time.sleep(window)
    return account.foreign_share()
