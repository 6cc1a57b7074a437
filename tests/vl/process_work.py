"""Work for prep worker processes in tests: importable by the spawned processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def announce_then_wait(started: str, release: str, limit: float = 20.0) -> str:
    """Create ``started``, then wait until ``release`` exists (at most ``limit`` seconds)."""
    Path(started).touch()
    deadline = time.monotonic() + limit
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "done"


def modules_loaded(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` this process has imported."""
    return [name for name in names if name in sys.modules]
