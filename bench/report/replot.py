"""Redraw the /health plots of a results JSON: ``python -m bench.report.replot FILE.json``.

Plots, per workload, each server's best run (by req/s) at each concurrency level, as
``bench.serve`` does, next to the JSON (``<stem>-<workload>-health.png``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report.health_plot import plot_series


def replot(path: Path) -> list[Path]:
    """Write the plots; return their paths."""
    data = json.loads(path.read_text())
    best: dict[tuple[str, int, str], dict] = {}
    for run in data["runs"]:
        s = run["summary"]
        key = (s["workload"], s["concurrency"], s["server"])
        if key not in best or s["request_throughput"] > best[key]["summary"]["request_throughput"]:
            best[key] = run
    out = []
    for workload in dict.fromkeys(k[0] for k in best):
        series = []
        for (w, level, server), run in best.items():
            if w == workload:
                duration = run["summary"]["duration_s"]
                series.append((server, level, [(t, ms) for t, ms, _ in run["health"] if 0 <= t <= duration]))
        target = path.with_name(f"{path.stem}-{workload}-health.png")
        out.append(plot_series(series, target, f"/health during the {workload} burst"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    for path in parser.parse_args().results:
        for written in replot(path):
            print(written)


if __name__ == "__main__":
    main()
