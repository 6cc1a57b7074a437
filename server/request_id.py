"""``X-Request-Id``: taken from the request when it is sane, else generated; always echoed."""

from __future__ import annotations

import re
import uuid

from quart import Quart, Response, g, request

HEADER = "X-Request-Id"
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def choose_request_id(presented: str | None) -> str:
    """The client's id if it is 1-128 URL-safe characters, else a fresh random one."""
    if presented is not None and _SANE.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


def current_request_id() -> str:
    """The id of the request being handled (inside a request context)."""
    return g.get("request_id") or "-"


def install_request_id(app: Quart) -> None:
    """Assign the id before any other hook runs and echo it on every response, errors too."""

    async def assign() -> None:
        g.request_id = choose_request_id(request.headers.get(HEADER))

    async def echo(response: Response) -> Response:
        response.headers[HEADER] = g.get("request_id") or choose_request_id(request.headers.get(HEADER))
        return response

    app.before_request_funcs.setdefault(None, []).insert(0, assign)
    app.after_request(echo)
