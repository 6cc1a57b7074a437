"""``GET /metrics``: Prometheus text exposition of ``server.metrics``.

Served requests normally never get here: ``server.http_path`` (inside the HTTP/1.1
protocol) or ``server.probe_fast_path`` (in front of Quart) answer it as they answer the
probes. This route gives the same answer to anything that calls the Quart app directly.
Exempt from API keys and admission (``server.probes.UNGATED_PATHS``).
"""

from __future__ import annotations

from quart import Blueprint, Response

from server.metrics import metrics_text
from server.state import current_state

blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Every figure, read now; never waits on anything."""
    body, content_type = metrics_text(current_state())
    return Response(body, status=200, content_type=content_type)
