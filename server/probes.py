"""The answers of ``GET /health`` (liveness) and ``GET /ready`` (readiness), as plain data.

Both are functions of in-memory state only: no auth, no admission, no body, no await on
preparation or the engine. ``server.probe_fast_path`` sends them; the Quart routes in
``server.routes.health`` give the same answers where a request reaches Quart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.lifecycle import Phase, RuntimeLifecycle


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _answer(status: int, phase: Phase, **headers: str) -> ProbeAnswer:
    body = json.dumps({"status": "ok" if status == 200 else "unavailable", "phase": phase.value})
    return ProbeAnswer(status, body.encode(), headers)


def health_answer(lifecycle: RuntimeLifecycle) -> ProbeAnswer:
    """200 while the process can make progress; 503 if the runtime failed or the engine
    stopped making progress while it has work (or its worker process died)."""
    runtime = lifecycle.runtime
    if lifecycle.phase is Phase.FAILED:
        return _answer(503, lifecycle.phase)
    if runtime is not None and not runtime.engine.is_healthy():
        return _answer(503, lifecycle.phase)
    return _answer(200, lifecycle.phase)


def ready_answer(lifecycle: RuntimeLifecycle) -> ProbeAnswer:
    """200 while new requests are served; 503 while loading, draining or failed."""
    phase = lifecycle.phase
    if phase is Phase.READY:
        return _answer(200, phase)
    return _answer(503, phase, **{"Retry-After": "5" if phase is Phase.LOADING else "1"})


PROBES = {"/health": health_answer, "/ready": ready_answer}
