"""Test-only prep steps: importable by prep worker processes (PYTHONPATH is the repo root)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from vl.prep_tools import ImagePixels, PrepTools


@dataclass(frozen=True)
class AnnounceThenImagePixels:
    """Create ``started``, wait until ``release`` exists (at most ``limit`` seconds), then
    run ``step``: an image step whose caller can be cancelled while it runs."""

    started: str
    release: str
    step: ImagePixels
    limit: float = 20.0

    def run(self, tools: PrepTools):
        Path(self.started).touch()
        deadline = time.monotonic() + self.limit
        while not Path(self.release).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.step.run(tools)


@dataclass(frozen=True)
class ExitProcess:
    """End the process running the step at once, with ``status`` (a crash, to the caller)."""

    status: int

    def run(self, tools: PrepTools):
        os._exit(self.status)
