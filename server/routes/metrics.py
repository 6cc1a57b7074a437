"""``GET /metrics``: Prometheus text exposition of ``server.metrics``.

Exempt from admission (``server.admission.EXEMPT_PATHS``): a saturated server is exactly
when its figures are wanted.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response

from server.metrics import ServerCollector
from server.state import current_state

blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Every figure, read now; never waits on anything."""
    body = generate_latest(ServerCollector(current_state()))  # type: ignore[arg-type]
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)
