"""A PNG of /health latency over time during each burst, one line per server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402

from bench.loadgen.metrics import burst_health  # noqa: E402
from bench.loadgen.run import LoadRun  # noqa: E402

TARGET_P99_MS = 5.0
TARGET_MAX_MS = 15.0


def plot_health(runs: Sequence[LoadRun], path: Path, title: str) -> Path:
    """Write the plot to ``path``: one panel per concurrency level, time since the burst
    started on x, probe latency (log scale, ms) on y, the issue's targets as dashed lines."""
    levels = sorted({run.options.concurrency for run in runs})
    fig, axes = plt.subplots(len(levels), 1, figsize=(10, 3.2 * len(levels)), squeeze=False, sharex=False)
    for axis, level in zip(axes[:, 0], levels, strict=True):
        for run in (r for r in runs if r.options.concurrency == level):
            samples = burst_health(run)
            xs = [s[0] - run.burst_started for s in samples]
            ys = [max(s[1] * 1000.0, 0.05) for s in samples]
            axis.plot(xs, ys, linewidth=0.9, label=f"{run.server} ({len(samples)} probes)")
        axis.axhline(TARGET_P99_MS, color="grey", linestyle="--", linewidth=0.7, label="target p99 5 ms")
        axis.axhline(TARGET_MAX_MS, color="grey", linestyle=":", linewidth=0.7, label="target max 15 ms")
        axis.set_yscale("log")
        axis.set_ylabel("/health latency (ms)")
        axis.set_xlabel("seconds since the burst started")
        axis.set_title(f"{title} — concurrency {level}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
