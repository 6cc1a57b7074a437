"""``GET /health`` and ``GET /ready`` as Quart routes.

Served requests normally never get here: ``server.probe_fast_path`` answers them in front
of Quart. The routes give the same answers (``server.probes``) to anything that calls the
Quart app directly, and make other methods on these paths a 405 rather than a 404.
"""

from __future__ import annotations

from quart import Blueprint, Response

from server.probes import ProbeAnswer, health_answer, ready_answer
from server.state import current_state

blueprint = Blueprint("health", __name__)


def _response(answer: ProbeAnswer) -> Response:
    response = Response(answer.body, status=answer.status, content_type="application/json")
    for name, value in answer.headers.items():
        response.headers[name] = value
    return response


@blueprint.get("/health")
async def health() -> Response:
    return _response(health_answer(current_state().lifecycle))


@blueprint.get("/ready")
async def ready() -> Response:
    return _response(ready_answer(current_state().lifecycle))
