"""How much CPU *other* processes and the hypervisor took: the benchmark's measure of a
noisy machine.

On a shared 2-core machine a test suite running beside the benchmark changes every
figure. ``CpuAccount`` counts, between ``start()`` and ``foreign_share()``, the CPU
seconds the whole machine was busy minus those of this process and all its descendants
(the server under test, the image server and the probe included), as a share of the
machine's capacity. Time the hypervisor gave to other virtual machines while this one
had work to run (``steal`` in ``/proc/stat``) is no process's here and is counted apart
(``steal_share()``): a run with a large steal share ran on less than two cores.
"""

from __future__ import annotations

import os
import time

import psutil


def _machine_times() -> tuple[float, float]:
    """Seconds all cores were busy running this machine's processes, and seconds stolen."""
    times = psutil.cpu_times()
    # user and nice already include guest and guest_nice (/proc/stat), so those are not added
    not_busy = ("idle", "iowait", "steal", "guest", "guest_nice")
    busy = sum(getattr(times, name) for name in times._fields if name not in not_busy)
    return busy, getattr(times, "steal", 0.0)


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
        self._start = (0.0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), *_machine_times(), _own_cpu())

    def foreign_share(self) -> float:
        """Other processes' CPU use since ``start()``, as a fraction of all cores (0..1);
        stolen time not included."""
        t0, busy0, _, own0 = self._start
        busy, _ = _machine_times()
        foreign = (busy - busy0) - (_own_cpu() - own0)
        return max(0.0, foreign / self._capacity(t0))

    def steal_share(self) -> float:
        """Time stolen by the hypervisor since ``start()``, as a fraction of all cores (0..1)."""
        t0, _, steal0, _ = self._start
        _, steal = _machine_times()
        return max(0.0, (steal - steal0) / self._capacity(t0))

    @staticmethod
    def _capacity(t0: float) -> float:
        return max(time.monotonic() - t0, 1e-6) * (psutil.cpu_count() or 1)


def foreign_load_now(window: float = 1.0) -> float:
    """The share of the machine that other processes and the hypervisor took over the next
    ``window`` seconds (blocks that long): what the benchmark did not have."""
    account = CpuAccount()
    account.start()
    time.sleep(window)
    return account.foreign_share() + account.steal_share()
