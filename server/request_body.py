"""Read and validate a JSON request body into a request model.

Small bodies are decoded on the event loop; large ones (base64 images) in a worker thread
under the app's parse limiter, so a big body never stalls other requests or ``/health``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio
from pydantic import BaseModel
from quart import request

from server.validation import parse_model
from vl.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
ModelChoice = type[M] | Callable[[dict[str, Any]], type[M]]

INLINE_PARSE_BYTES = 64 * 1024


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; ``InvalidRequest`` if it is not valid JSON or not an object."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. Send valid JSON with 'Content-Type: application/json'.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def decode_body(raw: bytes, model: ModelChoice[M]) -> M:
    """Decode and validate ``raw`` as ``model``; ``InvalidRequest`` names the bad param.

    ``model`` is a model class, or a function choosing one from the decoded object.
    """
    data = decode_json_object(raw)
    chosen = model if isinstance(model, type) else model(data)
    return parse_model(chosen, data)


async def read_body(model: ModelChoice[M], limiter: trio.CapacityLimiter) -> M:
    """Read the current request's body and validate it as ``model`` (see ``decode_body``).

    Raises ``RequestEntityTooLarge`` (413) past ``MAX_CONTENT_LENGTH`` and
    ``InvalidRequest`` (400) for bad JSON or values.
    Cancellation: while reading, immediate; while decoding in a thread, the caller waits
    for the thread to finish, so the limiter token is never returned early.
    """
    raw = await request.get_data(cache=False)
    if len(raw) <= INLINE_PARSE_BYTES:
        return decode_body(raw, model)
    return await trio.to_thread.run_sync(partial(decode_body, raw, model), limiter=limiter)
