"""Model loading, stage by stage: ``tokenizer``, ``processor``, ``weights``, ``warm-up``.

The loader (``engine.model_loader``, in a worker thread) and ``server.runtime`` call
``LoadProgress.stage(name)`` as each stage starts, and ``done()`` once the runtime is
ready. On a terminal (stderr is a tty) one line is rewritten in place
(``loading model: [3/4] weights ... 12.4 s``) and the stage records go to the log at DEBUG;
otherwise each stage is an INFO log line on ``vlserve.load`` (containers, files, journald).
A text-only model has no ``processor`` stage; with the engine in its worker process the
``weights`` stage is that process reading them.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

STAGES = ("tokenizer", "processor", "weights", "warm-up")

log = logging.getLogger("vlserve.load")


class LoadProgress:
    """Reports the loading stages; safe to call from any thread (one line at a time)."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream if stream is not None else sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self.tty = bool(isatty()) if isatty is not None else False
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self.stages: list[str] = []  # the stages reported so far, in order

    def stage(self, name: str, detail: str = "") -> None:
        """Stage ``name`` (one of ``STAGES``) starts now; ``detail`` is added to the line."""
        elapsed = self._clock() - self._started
        number = STAGES.index(name) + 1 if name in STAGES else len(STAGES)
        text = f"loading model: [{number}/{len(STAGES)}] {name}{f' ({detail})' if detail else ''}"
        with self._lock:
            self.stages.append(name)
            if self.tty:
                self._stream.write(f"\r\x1b[K{text} ... {elapsed:.1f} s")
                self._stream.flush()
                log.debug("%s after %.1f s", text, elapsed)
            else:
                log.info("%s after %.1f s", text, elapsed)

    def done(self) -> None:
        """Loading is over: ends the terminal line (the lifecycle logs the summary line)."""
        with self._lock:
            if self.tty:
                self._stream.write(f"\r\x1b[Kloading model: ready in {self._clock() - self._started:.1f} s\n")
                self._stream.flush()
