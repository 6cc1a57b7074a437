"""Where one request's preparation time went: its stages and its waits at the gates.

``ChatPreparer.prepare_chat`` fills one ``PrepTimings`` per request as the work happens and
returns it on the ``PreparedPrompt``; the server feeds its histograms and the access-log
line from it once the prompt is ready (docs/architecture.md, "Metrics"). Nothing here
polls or takes a lock: each figure is a clock difference the preparer already had at hand.

Stages (``STAGES``), one observation per image for the image stages:

- ``fetch``: getting an image's bytes (``data:`` parse, ``file://`` read or HTTP fetch,
  the fetch limiter's wait included), on the event loop;
- ``decode``: bytes to pixels, measured in the worker (thread or prep process) that ran it;
- ``preprocess``: resize, normalize, patchify and the write into the pixel slot, measured
  in the worker;
- ``tokenize``: the chat template rendered and tokenized: the time the tokenizer gate's
  token was held (the work, and handing it to and from the worker).

The engine's vision encoder (the ``encode`` stage) runs inside the engine's step, after
the prompt is ready; the engine reports it (``engine.step_timings``).

Gate waits (``GATES``): seconds a request waited for a token of the tokenizer gate or the
image-prep gate (``vl.gates``), for a free pixel slot (``engine.pixel_slots``), or for a
slot of the image fetcher's limiter (``fetch``, HTTP images only). The server adds the
``parse`` gate (large request bodies decoded in a thread) to the same histogram.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("fetch", "decode", "preprocess", "tokenize")
GATES = ("tokenizer", "image_prep", "pixel_slots", "fetch")
# the keys of ``PrepTimings.summary_ms``
PREP_SUMMARY_FIELDS = (*(f"{name}_ms" for name in STAGES), "gate_wait_ms")


@dataclass
class PrepTimings:
    """One request's preparation figures, in seconds, in the order they were measured."""

    stages: list[tuple[str, float]] = field(default_factory=list)
    gate_waits: list[tuple[str, float]] = field(default_factory=list)

    def stage(self, name: str, seconds: float | None) -> None:
        """One run of stage ``name`` took ``seconds`` (``None``: not measured, ignored)."""
        if seconds is not None:
            self.stages.append((name, max(0.0, seconds)))

    def gate_wait(self, gate: str, seconds: float | None) -> None:
        """The request waited ``seconds`` for a token of ``gate`` (``None``: ignored)."""
        if seconds is not None:
            self.gate_waits.append((gate, max(0.0, seconds)))

    def stage_total(self, name: str) -> float:
        return sum(seconds for stage, seconds in self.stages if stage == name)

    def gate_wait_total(self) -> float:
        return sum(seconds for _, seconds in self.gate_waits)

    def summary_ms(self) -> dict[str, float]:
        """Milliseconds per stage (summed over images) and waited at gates in all: the
        access-log fields ``fetch_ms``, ``decode_ms``, ``preprocess_ms``, ``tokenize_ms``,
        ``gate_wait_ms``."""
        out = {f"{name}_ms": round(self.stage_total(name) * 1000, 2) for name in STAGES}
        out["gate_wait_ms"] = round(self.gate_wait_total() * 1000, 2)
        return out
