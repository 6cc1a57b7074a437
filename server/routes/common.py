"""What every work route does first: find the runtime, check the model, answer JSON."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from pydantic import BaseModel
from quart import Response

from server.errors import model_not_found, unavailable
from server.lifecycle import Phase
from server.state import current_state

if TYPE_CHECKING:
    from server.runtime import Runtime

_UNAVAILABLE = MappingProxyType(
    {
        Phase.LOADING: ("The model is still loading; please retry shortly.", "model_loading", 5),
        Phase.DRAINING: ("The server is shutting down.", "shutting_down", 1),
        Phase.STOPPED: ("The server is shutting down.", "shutting_down", 1),
        Phase.FAILED: ("The model is not available; see the server log.", "model_failed", 30),
    }
)


def serving_runtime() -> Runtime:
    """The runtime, if it may take new work; else a 503 ``ApiError`` saying why."""
    lifecycle = current_state().lifecycle
    runtime = lifecycle.runtime
    if runtime is not None and lifecycle.takes_new_work:
        return runtime
    message, code, retry_after = _UNAVAILABLE.get(lifecycle.phase, _UNAVAILABLE[Phase.STOPPED])
    raise unavailable(message, code, retry_after)


def check_model(requested: str | None, runtime: Runtime) -> None:
    """404 ``model_not_found`` unless ``requested`` is absent or the served model's id."""
    if requested is not None and requested != runtime.model_name:
        raise model_not_found(requested)


def json_response(payload: BaseModel, status: int = 200) -> Response:
    return Response(payload.model_dump_json(), status=status, content_type="application/json")
