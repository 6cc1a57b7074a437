"""A PNG of /health latency over time during each burst, one line per server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt

from bench.loadgen.metrics import burst_health
from bench.loadgen.run import LoadRun

TARGET_P99_MS = 5.0
TARGET_MAX_MS = 15.0
COLOURS = (
    ("vlserve", "tab:blue"),
    ("vlserve-thread", "tab:purple"),
    ("vlserve-prep-threads", "tab:cyan"),
    ("pr-style", "tab:orange"),
    ("main-style", "tab:green"),
)

# (server, concurrency, [(seconds since the burst started, latency ms), ...])
Series = tuple[str, int, list[tuple[float, float]]]


def plot_health(runs: Sequence[LoadRun], path: Path, title: str) -> Path:
    """Plot the probes sent during each run's burst (see ``plot_series``)."""
    series = [
        (run.server, run.options.concurrency, [(s[0] - run.burst_started, s[1] * 1000.0) for s in burst_health(run)])
        for run in runs
    ]
    return plot_series(series, path, title)


def plot_series(series: Sequence[Series], path: Path, title: str) -> Path:
    """Write the plot to ``path``: one panel per concurrency level, time since the burst
    started on x, probe latency (log scale, ms) on y, one colour per server (vlserve drawn
    on top), the issue's targets as dashed lines."""
    colours = dict(COLOURS)
    levels = sorted({level for _, level, _ in series})
    fig, axes = plt.subplots(len(levels), 1, figsize=(10, 3.2 * len(levels)), squeeze=False)
    for axis, level in zip(axes[:, 0], levels, strict=True):
        picked = sorted((s for s in series if s[1] == level), key=lambda s: s[0] == "vlserve")
        for server, _, points in picked:
            axis.plot(
                [t for t, _ in points],
                [max(ms, 0.05) for _, ms in points],
                linewidth=0.9,
                color=colours.get(server),
                zorder=3 if server == "vlserve" else 2,
                label=f"{server} ({len(points)} probes)",
            )
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
