"""Write a benchmark's results: JSON (every figure and time series) and Markdown (tables)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen.metrics import Summary
from bench.loadgen.run import LoadRun


def _clean(value):
    """JSON has no NaN: write ``null`` instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def run_record(run: LoadRun, summary: Summary) -> dict:
    """One run: its summary, options, and its /health and RSS series relative to the burst start."""
    t0 = run.burst_started
    return {
        "summary": summary.as_dict(),
        "options": vars(run.options),
        "loadavg_1m": [run.loadavg_before, run.loadavg_after],
        "warmup_failures": run.warmup_failures,
        "health": [[round(s[0] - t0, 4), round(s[1] * 1000.0, 3), s[2]] for s in run.health],
        "health_fresh": [[round(s[0] - t0, 4), round(s[1] * 1000.0, 3), s[2]] for s in run.health_fresh],
        "rss_mib": [[round(s[0] - t0, 3), round(s[1] / 2**20, 1)] for s in run.rss],
        "errors": sorted({r.error for r in run.results if r.error})[:20],
    }


def write_results(
    stem: Path, *, command: str, meta: dict, runs: Sequence[tuple[LoadRun, Summary]], markdown: str
) -> list[Path]:
    """Write ``stem.json`` and ``stem.md``; return their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command, **meta, "runs": [run_record(run, summary) for run, summary in runs]}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(_clean(data), separators=(",", ":")))
    md_path = stem.with_suffix(".md")
    md_path.write_text(f"`{command}`\n\n{markdown}\n")
    return [json_path, md_path]
