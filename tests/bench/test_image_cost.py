"""bench/image_cost.py runs on the tiny model and prints one CPU figure per stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prints_a_figure_for_every_stage(tmp_path, tiny_model_dir):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    args = ["--model", str(tiny_model_dir), "--size", "256", "--images", "2", "--batch", "2", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.image_cost", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", done.stdout, re.M))
    assert list(rows)[:4] == [
        "decode (JPEG to RGB)",
        "preprocess, then copy into a slot",
        "preprocess into the slot",
        "engine's copy out of the slot",
    ]
    assert "vision tower, patch embedding as Conv3d" in rows
    assert "vision tower, patch embedding as matrix product" in rows
    assert all(float(ms) > 0 for ms in rows.values())
    assert len(list((tmp_path / "vlserve-bench" / "natural-256").glob("*.jpg"))) == 2
