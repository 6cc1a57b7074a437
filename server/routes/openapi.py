"""``GET /openapi.json``: the OpenAPI document of the routes (``server.openapi``)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

from quart import Blueprint, Response

from server.openapi import openapi_document

blueprint = Blueprint("openapi", __name__)


def _version() -> str:
    try:
        return version("vlserve")
    except PackageNotFoundError:
        return "0"


@blueprint.get("/openapi.json")
async def openapi() -> Response:
    """The document, built from the schemas on each call (rarely asked; never waits on the model)."""
    return Response(json.dumps(openapi_document(version=_version())), status=200, content_type="application/json")
