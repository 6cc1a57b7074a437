"""Turn pydantic validation errors into one ``InvalidRequest`` that names the bad parameter.

Parameters are named the way OpenAI and our ``vl`` layer name them: dotted fields with
bracketed indices, e.g. ``messages[0].content[1].image_url.url``. Pydantic puts union
member tags (``str``, ``list[...]``) into error locations; they are dropped by walking the
location against the input itself, so only real keys and indices remain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from vl.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


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
