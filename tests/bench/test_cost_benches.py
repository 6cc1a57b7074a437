"""bench/image_cost.py and bench/step_loop.py run on the tiny model and print their tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(module: str, args: list[str], **env: str) -> str:
    """The standard output of ``python -m module *args`` run from the repository root
    (raises if it fails or takes over 300 s)."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout


def test_prints_a_figure_for_every_stage(tmp_path, tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--size", "256", "--images", "2", "--batch", "2", "--repeats", "1"]
    stdout = run_bench("bench.image_cost", args, XDG_CACHE_HOME=str(tmp_path))
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", stdout, re.M))
    assert list(rows)[:4] == [
        "decode (JPEG to RGB)",
        "preprocess, then copy into a slot",
        "preprocess into the slot",
        "engine's copy out of the slot",
    ]
    assert "vision tower, patch embedding as Conv3d, whole patches" in rows
    assert "vision tower, patch embedding as matrix product, one frame" in rows
    assert all(float(ms) > 0 for ms in rows.values())
    assert len(list((tmp_path / "vlserve-bench" / "natural-256").glob("*.jpg"))) == 2


def test_step_loop_bench_prints_a_row_per_concurrency(tiny_model_dir):
    """bench/step_loop.py drives the real step loop to completion and prints its table."""
    args = ["--model", str(tiny_model_dir), "--concurrency", "2,4", "--requests", "6", "--max-tokens", "3"]
    stdout = run_bench("bench.step_loop", [*args, "--repeats", "1"])
    rows = re.findall(r"^\| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| (\d+) \|", stdout, re.M)
    assert [int(r[0]) for r in rows] == [2, 4]
    assert all(float(rate) > 0 and float(cpu) > 0 and int(steps) >= 1 for _, rate, cpu, steps in rows)
