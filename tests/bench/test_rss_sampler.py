"""The load generator's sampler of the server's process tree: RSS at every interval, PSS
(which costs the load generator a smaps read per process) only every ``pss_interval``, and
CPU seconds by part of the tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
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


def test_cpu_seconds_are_split_by_part_of_the_process_tree():
    """The root is the front end, a descendant run as ``python -m engine.worker_main`` the
    engine, any other descendant prep; the parts add up to the tree's total."""
    burn = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass\ntime.sleep(60)"
    engine = subprocess.Popen([sys.executable, "-c", burn, "engine.worker_main"])
    prep = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 30
        children = [psutil.Process(engine.pid), psutil.Process(prep.pid)]
        while any(sum(p.cpu_times()[:2]) < 0.2 for p in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        by_role = rss_sampler.tree_cpu_seconds_by_role(os.getpid())
        total = rss_sampler.tree_cpu_seconds(os.getpid())
    finally:
        for child in (engine, prep):
            child.kill()
            child.wait()
    assert set(by_role) == set(rss_sampler.CPU_ROLES)
    assert by_role["engine"] >= 0.2 and by_role["prep"] >= 0.2 and by_role["front end"] > 0
    assert sum(by_role.values()) == pytest.approx(total, abs=0.05)
