"""Read and validate a JSON request body into a request model, or one ``InvalidRequest``.

Small bodies are decoded on the event loop; large ones (base64 images) in a worker thread
under the app's parse limiter, so a big body never stalls other requests or ``/health``.

Validation errors name the bad parameter the way OpenAI and our ``vl`` layer do: dotted
fields with bracketed indices, e.g. ``messages[0].content[1].image_url.url``. Pydantic puts
union member tags (``str``, ``list[...]``) into error locations; they are dropped by walking
the location against the input itself, so only real keys and indices remain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import orjson
import trio
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from quart import request

from server.schemas.chat import ChatMessages, chat_of
from vl.chat_messages import Chat
from vl.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)
ModelChoice = type[M] | Callable[[dict[str, Any]], type[M]]

INLINE_PARSE_BYTES = 64 * 1024
# No request field nests anywhere near this deep (a tool's parameter schema is the deepest
# part of a request); the bound keeps every recursive walk below (validation, schema
# rewriting, grammar compilation) far from Python's recursion limit.
MAX_JSON_DEPTH = 64
# Integers are 64-bit: a wider one (orjson reads it as a float) fits no field.
MIN_INT = -(2**63)
INT_BOUND = 2**64


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; ``InvalidRequest`` (``invalid_json``) if it is not one.

    The rules every body meets before validation, in one place: valid UTF-8 without lone
    surrogates, standard JSON (no ``NaN``/``Infinity``, no number that overflows a double),
    nesting at most ``MAX_JSON_DEPTH`` deep, every number within 64-bit integers' range.
    A key given twice keeps its last value (as Python's ``json`` and vLLM do).
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({error.msg}). "
            "Send valid JSON with 'Content-Type: application/json'.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    _check_json_values(data)
    return data


def _check_json_values(data: dict[str, Any]) -> None:
    """Raise ``InvalidRequest`` for a value nested deeper than ``MAX_JSON_DEPTH`` (naming
    its top-level field) or a number outside 64-bit integers' range (naming its path). Iterative: never
    recurses, whatever the input."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            top_field = path.split(".", 1)[0].split("[", 1)[0]
            raise InvalidRequest(
                f"The request body nests deeper than {MAX_JSON_DEPTH} levels.",
                param=top_field or None,
                code="invalid_json",
            )
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, _child(path, key)))
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and not MIN_INT <= value < INT_BOUND:
                child = _child(path, key)
                raise InvalidRequest(
                    f"Invalid value for '{child}': numbers must lie within the range of 64-bit integers.",
                    param=child,
                    code="number_out_of_range",
                )


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


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


def parse_chat(messages: Any) -> Chat:
    """Validate OpenAI-shaped ``messages`` (plain JSON data) as the chat endpoint does and
    return the typed chat; raises ``InvalidRequest`` naming the bad field. For callers that
    hold messages outside an HTTP request (benchmarks, tests)."""
    return chat_of(parse_model(ChatMessages, {"messages": messages}).messages)


def parse_model(model: type[M], data: Any) -> M:
    """Validate ``data`` as ``model``; raise ``InvalidRequest`` naming the first bad param."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise invalid_request_from(error, data) from None


def invalid_request_from(error: ValidationError, data: Any) -> InvalidRequest:
    """The ``InvalidRequest`` for the most telling error of ``error``.

    Errors are grouped by top-level field in input order; within the first group the
    deepest location wins (for a union, the member that got furthest explains best).
    """
    details = error.errors(include_url=False, include_input=False)
    first_field = details[0]["loc"][:1]
    group = [d for d in details if d["loc"][:1] == first_field]
    paths = [param_path(d["loc"], data, d["type"]) for d in group]
    depth = [p.count(".") + p.count("[") if p else -1 for p in paths]
    best = depth.index(max(depth))
    return InvalidRequest(_message(group[best], paths[best]), param=paths[best])


def param_path(loc: Sequence[int | str], data: Any, error_type: str = "") -> str | None:
    """Render ``loc`` as ``a.b[0].c``, keeping only segments that index into ``data``.

    The last segment of a ``missing`` error is kept although the input lacks it.
    """
    text = ""
    node = data
    for position, segment in enumerate(loc):
        is_last = position == len(loc) - 1
        if isinstance(segment, int) and isinstance(node, list) and 0 <= segment < len(node):
            text += f"[{segment}]"
            node = node[segment]
        elif isinstance(segment, str) and isinstance(node, dict) and segment in node:
            text += f".{segment}" if text else segment
            node = node[segment]
        elif isinstance(segment, str) and is_last and error_type == "missing":
            text += f".{segment}" if text else segment
    return text or None


def _message(detail: ErrorDetails, param: str | None) -> str:
    kind = detail["type"]
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}"
    if kind == "unsupported_parameter":
        field = detail.get("ctx", {}).get("field")
        if param is not None and param.rsplit(".", 1)[-1] == field:  # a nested field: name its path
            return f"'{param}' is not supported by this server."
        return detail["msg"]
    if kind == "missing":
        return f"Missing required parameter: '{param}'."
    if param is None:
        return f"Invalid request: {detail['msg']}"
    return f"Invalid value for '{param}': {detail['msg']}"
