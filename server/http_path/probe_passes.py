"""Scheduler passes per answered probe, kept by the server for the benchmark.

With ``VLSERVE_PROBE_PASSES_FILE`` set, ``vlserve serve`` installs a ``PassCounter`` and a
``ProbePassLog``, and writes the log's summary to that file when it stops; the benchmark
prints it (bench/README.md). A probe's count runs from the first pass that could see its
bytes to the pass in which its reply is written, both included: 1 means the reply was
written in the pass that read the request. On a fresh connection (the Kubernetes way)
whose request is already there when it is accepted, the first pass is the accept's (a
connection accepted in the same pass as others is read in the next one: 2); if the bytes
arrive later, the pass that wakes up for them (passes spent waiting for the client are
not the server's). A probe answered by the ``ProbeLane`` (its thread, or its process, whose
counts are read through ``off_loop_counts``) needs no pass: 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.scheduler_passes import PassCounter

# The environment variable naming the file the summary is written to (unset: no counting).
PROBE_PASSES_FILE_ENV = "VLSERVE_PROBE_PASSES_FILE"


@dataclass
class ProbePassLog:
    """Histograms (passes -> probes) of fresh-connection and keep-alive probes."""

    counter: PassCounter
    fresh: Counter[int] = field(default_factory=Counter)
    keep_alive: Counter[int] = field(default_factory=Counter)
    # functions returning (fresh, keep-alive) probes answered in another process: 0 passes
    off_loop_counts: list[Callable[[], tuple[int, int]]] = field(default_factory=list)

    def record(self, *, fresh: bool, since_pass: int) -> None:
        """Record a probe whose reply is written now, started in pass ``since_pass``."""
        passes = self.counter.passes - since_pass + 1
        (self.fresh if fresh else self.keep_alive)[passes] += 1

    def record_off_loop(self, fresh: bool) -> None:
        """Record a probe answered off the loop (by the ``ProbeLane``'s thread): 0 passes."""
        (self.fresh if fresh else self.keep_alive)[0] += 1

    def histograms(self) -> tuple[Counter[int], Counter[int]]:
        """(fresh, keep-alive) histograms, with the probes answered in other processes."""
        fresh, keep_alive = Counter(self.fresh), Counter(self.keep_alive)
        for counts in self.off_loop_counts:
            elsewhere_fresh, elsewhere_keep_alive = counts()
            fresh[0] += elsewhere_fresh
            keep_alive[0] += elsewhere_keep_alive
        return +fresh, +keep_alive

    def summary(self) -> dict[str, dict[str, object]]:
        fresh, keep_alive = self.histograms()
        return {
            "fresh": _summarise(fresh),
            "keep_alive": _summarise(keep_alive),
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.summary(), indent=1))


def _summarise(histogram: Counter[int]) -> dict[str, object]:
    probes = sum(histogram.values())
    if not probes:
        return {"probes": 0}
    return {
        "probes": probes,
        "mean": sum(passes * n for passes, n in histogram.items()) / probes,
        "max": max(histogram),
        "histogram": {str(passes): n for passes, n in sorted(histogram.items())},
    }
