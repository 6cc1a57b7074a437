"""Counting trio scheduler passes: the unit a probe's latency is made of.

One pass of trio's run loop is one I/O wait (``epoll_wait``) followed by one batch of task
steps. A request that needs N passes waits for N batches of everyone else's work, so its
latency under load is about N times the length of a pass (bench/README.md). Counting
passes is deterministic where timing is not, so tests and the benchmark count them.
"""

from __future__ import annotations

import trio


class PassCounter(trio.abc.Instrument):
    """A trio instrument counting scheduler passes (``before_io_wait`` calls).

    Install with ``trio.lowlevel.add_instrument``; read ``passes`` before and after the
    thing being measured. Costs one integer increment per pass.
    """

    def __init__(self) -> None:
        self.passes = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1
