"""The load generator's memory sampler: RSS at every interval, PSS (which costs the load
generator a smaps read per process) only every ``pss_interval``."""

from __future__ import annotations

import os

import trio

from bench.loadgen import rss_sampler


async def test_pss_is_read_once_per_pss_interval_and_rss_every_interval(autojump_clock, monkeypatch):
    """Over 2.05 s of trio time at 0.1 s intervals: 21 RSS readings, and PSS readings at
    0, 1 and 2 s only; every reading of this process is positive. (Readings run in the
    test's thread here, so that the autojump clock sees them.)"""

    async def read_here(measure, pid):
        await trio.lowlevel.checkpoint()
        return measure(pid)

    monkeypatch.setattr(rss_sampler, "_read", read_here)
    rss: list[tuple[float, int]] = []
    pss: list[tuple[float, int]] = []
    with trio.move_on_after(2.05):
        await rss_sampler.sample_rss(os.getpid(), 0.1, rss, pss, pss_interval=1.0)
    assert len(rss) == 21
    assert len(pss) == 3
    assert all(value > 0 for _, value in rss + pss)
