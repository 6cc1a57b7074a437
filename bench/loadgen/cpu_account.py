"""How much CPU *other* processes and the hypervisor took: the benchmark's measure of a
noisy machine.

On a shared 2-core machine a test suite running beside the benchmark changes every
figure. ``CpuAccount`` counts, between ``start()`` and ``shares()``, the CPU
seconds the whole machine was busy minus those of this process and all its descendants
(the server under test, the image server and the probe included), as a share of the
machine's capacity. Time the hypervisor gave to other virtual machines while this one
had work to run (``steal`` in ``/proc/stat``) is no process's here and is counted apart
(``CpuShares.stolen``): a run with a large steal share ran on less than two cores.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class CpuShares:
    """Fractions of all cores (0..1) over one window."""

    foreign: float  # other processes' CPU
    stolen: float  # time the hypervisor gave to other tenants

    @property
    def unavailable(self) -> float:
        """What the benchmark's processes could not have had."""
        return self.foreign + self.stolen


@dataclass(frozen=True)
class _Reading:
    at: float  # time.monotonic()
    busy: float  # seconds all cores ran this machine's processes
    stolen: float  # seconds stolen
    own: float  # CPU seconds of this process and its descendants


def _read() -> _Reading:
    times = psutil.cpu_times()
    # user and nice already include guest and guest_nice (/proc/stat), so those are not added
    not_busy = ("idle", "iowait", "steal", "guest", "guest_nice")
    busy = sum(getattr(times, name) for name in times._fields if name not in not_busy)
    return _Reading(time.monotonic(), busy, getattr(times, "steal", 0.0), _own_cpu())


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
        self._start = _Reading(0.0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = _read()

    def shares(self) -> CpuShares:
        """Other processes' CPU and the stolen time since ``start()``, from one reading."""
        before, now = self._start, _read()
        capacity = max(now.at - before.at, 1e-6) * (psutil.cpu_count() or 1)
        foreign = (now.busy - before.busy) - (now.own - before.own)
        return CpuShares(max(0.0, foreign / capacity), max(0.0, (now.stolen - before.stolen) / capacity))


def foreign_load_now(window: float = 1.0) -> float:
    """The share of the machine that other processes and the hypervisor took over the next
    ``window`` seconds (blocks that long): what the benchmark did not have."""
    account = CpuAccount()
    account.start()
    time.sleep(window)
    return account.shares().unavailable
