"""How one load run is shaped: how many requests, how fast, how long, how much output."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadOptions:
    """One run's shape.

    Closed loop (``request_rate`` is ``None``): ``concurrency`` clients each send their next
    request as soon as the previous one ends. Open loop: requests arrive as a Poisson
    process of ``request_rate`` per second, at most ``concurrency`` in flight. Either way the
    run sends ``warmup`` unmeasured requests first (all at once, at most ``concurrency``),
    then at most ``num_requests`` measured ones, and stops issuing after ``max_seconds``;
    requests still running ``grace_seconds`` later are cancelled and counted as cut off.
    ``/health`` is probed every ``health_interval`` seconds, from ``idle_probe_seconds``
    before the warm-up (the idle baseline) to as long after the burst. Every request is a
    streaming chat completion, or with ``stream`` False a non-streaming one
    (``bench.loadgen.chat_request``). Each request in flight has a client and a
    connection of its own (``bench.loadgen.client_pool``), kept alive and reused, as the
    async ``openai`` client and vLLM's benchmark do; ``connection_per_request`` sends every
    request with ``Connection: close`` instead, so the server accepts a new connection per
    request (what a client that drops the connection after ``[DONE]`` costs it, as the
    synchronous ``openai`` client does).
    """

    concurrency: int = 32
    num_requests: int = 256
    max_seconds: float = 180.0
    warmup: int = 4
    max_tokens: int = 32
    ignore_eos: bool = True
    request_rate: float | None = None
    grace_seconds: float = 60.0
    health_interval: float = 0.02
    idle_probe_seconds: float = 1.0
    rss_interval: float = 0.1
    seed: int = 0
    stream: bool = True
    connection_per_request: bool = False

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_requests < 1 or self.warmup < 0 or self.max_tokens < 1:
            raise ValueError("concurrency, num_requests and max_tokens must be >= 1, warmup >= 0")
        for name in ("max_seconds", "grace_seconds", "health_interval", "rss_interval", "idle_probe_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number")
        if self.request_rate is not None and not (math.isfinite(self.request_rate) and self.request_rate > 0):
            raise ValueError("request_rate must be a positive number")

    @property
    def mode(self) -> str:
        """How requests arrive, and ", non-streaming" when they are."""
        arrivals = "closed-loop" if self.request_rate is None else f"poisson {self.request_rate:g}/s"
        return arrivals if self.stream else f"{arrivals}, non-streaming"
