"""``GET /health`` and ``GET /ready`` as Quart routes, one per entry of ``server.probes.PROBES``.

Served requests normally never get here: ``server.http_path`` or ``server.probe_fast_path``
answer them first. The routes give the same answers to anything that calls the Quart app
directly, and make other methods on these paths a 405 rather than a 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from quart import Blueprint, Response

from server.probes import PROBES, ProbeAnswer, ProbeFacts, facts_of
from server.state import current_state

blueprint = Blueprint("health", __name__)


def _response(answer: ProbeAnswer) -> Response:
    response = Response(answer.body, status=answer.status, content_type="application/json")
    for name, value in answer.headers.items():
        response.headers[name] = value
    return response


def _route(
    answer: Callable[[ProbeFacts], ProbeAnswer],
) -> Callable[[], Awaitable[Response]]:
    async def probe() -> Response:
        return _response(answer(facts_of(current_state().lifecycle)))

    return probe


for _path, _answer in PROBES.items():
    blueprint.add_url_rule(_path, f"probe{_path.replace('/', '_')}", _route(_answer), methods=["GET"])
