"""``GET /health`` (liveness) and ``GET /ready`` (readiness).

Both answer from in-memory state at once: no auth, no admission, no body, no await on
preparation or the engine.
"""

from __future__ import annotations

import json

from quart import Blueprint, Response

from server.lifecycle import Phase
from server.state import current_state

blueprint = Blueprint("health", __name__)


def _status(status: int, phase: Phase, **extra: str) -> Response:
    body = json.dumps({"status": "ok" if status == 200 else "unavailable", "phase": phase.value})
    response = Response(body, status=status, content_type="application/json")
    for name, value in extra.items():
        response.headers[name] = value
    return response


@blueprint.get("/health")
async def health() -> Response:
    """200 while the process can make progress; 503 if the runtime failed or the engine's
    step loop stopped making progress while it has work."""
    lifecycle = current_state().lifecycle
    runtime = lifecycle.runtime
    if lifecycle.phase is Phase.FAILED:
        return _status(503, lifecycle.phase)
    if runtime is not None and not runtime.engine.is_healthy():
        return _status(503, lifecycle.phase)
    return _status(200, lifecycle.phase)


@blueprint.get("/ready")
async def ready() -> Response:
    """200 while new requests are served; 503 while loading, draining or failed."""
    phase = current_state().lifecycle.phase
    if phase is Phase.READY:
        return _status(200, phase)
    return _status(503, phase, **{"Retry-After": "5" if phase is Phase.LOADING else "1"})
