"""``GET /v1/models`` and ``GET /v1/models/{id}``: the one model this server serves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Blueprint, Response

from server.errors import model_not_found
from server.routes.common import json_response, serving_runtime
from server.schemas.models import ModelCard, ModelList

if TYPE_CHECKING:
    from server.runtime import Runtime

blueprint = Blueprint("models", __name__)


def model_card(runtime: Runtime) -> ModelCard:
    return ModelCard(id=runtime.model_name, created=runtime.created, max_model_len=runtime.max_model_len)


@blueprint.get("/v1/models")
async def list_models() -> Response:
    """The served model (503 while loading or draining). Never waits on anything."""
    return json_response(ModelList(data=[model_card(serving_runtime())]))


@blueprint.get("/v1/models/<path:model_id>")
async def retrieve_model(model_id: str) -> Response:
    """The served model's card, or 404 ``model_not_found``."""
    runtime = serving_runtime()
    if model_id != runtime.model_name:
        raise model_not_found(model_id)
    return json_response(model_card(runtime))
