"""What one request did, as the client saw it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """Times are seconds on ``time.perf_counter``'s clock.

    ``chunk_times`` holds the arrival time of every SSE chunk that carried output text; the
    first is the time to first token. A non-streaming request has one "chunk", the whole
    response, which arrives at ``ended`` (``bench.loadgen.chat_request.complete_chat``).
    ``output_tokens`` is the server's ``usage`` count when it sent one, else the number of
    such chunks; ``prompt_tokens`` is the server's ``usage`` count (image tokens included),
    0 when it sent none.
    """

    index: int
    kind: str
    started: float
    ended: float = 0.0
    ok: bool = False
    error: str | None = None
    status: int | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.started if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.ended - self.started

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive output chunks."""
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT); ``None`` for one token."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)
