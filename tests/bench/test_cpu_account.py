"""The noisy-machine figures: other processes' CPU and the hypervisor's stolen time, from
hand-made ``/proc/stat`` readings."""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import pytest

from bench.loadgen import cpu_account
from bench.loadgen.cpu_account import CpuAccount

# psutil's Linux fields; user and nice already include guest and guest_nice, as in /proc/stat
CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice")


class FakeMachine:
    """Two cores whose counters, our own processes' CPU and the clock the test sets."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.times = CpuTimes(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        self.own = 0.0
        self.now = 100.0
        self.during_sleep: dict[str, float] = {}
        # the module's own names only, not the psutil and time modules every caller shares
        monkeypatch.setattr(cpu_account, "psutil", SimpleNamespace(cpu_times=lambda: self.times, cpu_count=lambda: 2))
        monkeypatch.setattr(cpu_account, "_own_cpu", lambda: self.own)
        monkeypatch.setattr(cpu_account, "time", SimpleNamespace(monotonic=lambda: self.now, sleep=self.advance))

    def advance(self, seconds: float, **deltas: float) -> None:
        """The clock moves on by ``seconds`` and each named counter by its delta (a call
        as ``time.sleep`` adds ``during_sleep``)."""
        deltas = deltas or self.during_sleep
        self.now += seconds
        self.times = self.times._replace(**{name: getattr(self.times, name) + d for name, d in deltas.items()})


def test_stolen_time_is_counted_apart_from_other_processes(monkeypatch):
    """Over 10 s of two cores (20 core-seconds): our processes ran 8 s, the machine was busy
    11 s (so others ran 3 s: 15 %), and the hypervisor stole 4 s (20 %), which is no
    process's and must not be read as another process's load."""
    machine = FakeMachine(monkeypatch)
    account = CpuAccount()
    account.start()
    machine.own += 8.0
    machine.advance(10.0, user=9.0, system=2.0, idle=5.0, steal=4.0)
    shares = account.shares()
    assert shares.foreign == pytest.approx(0.15)
    assert shares.stolen == pytest.approx(0.20)


def test_guest_time_is_not_counted_twice(monkeypatch):
    """A host running guests reports their time inside user too; busy time counts it once."""
    machine = FakeMachine(monkeypatch)
    account = CpuAccount()
    account.start()
    machine.advance(10.0, user=6.0, guest=6.0, idle=14.0)
    shares = account.shares()
    assert shares.foreign == pytest.approx(0.30)
    assert shares.stolen == 0.0


def test_the_quiet_wait_counts_both(monkeypatch):
    """``foreign_load_now`` (what ``--quiet-wait`` waits on) is what the benchmark did not
    have: other processes' share plus the stolen share."""
    machine = FakeMachine(monkeypatch)
    machine.during_sleep = {"user": 0.4, "steal": 0.6, "idle": 1.0}
    assert cpu_account.foreign_load_now(1.0) == pytest.approx(0.5)
