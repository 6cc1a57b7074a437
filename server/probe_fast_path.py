"""``GET``/``HEAD`` ``/health`` and ``/ready`` answered at the ASGI layer, in front of Quart.

Quart-trio handles a request in tasks of its own, with a request context, hooks and a
response object, and each of those steps waits for a turn of the event loop behind every
stream's work: under a 64-stream load ``/health`` took 5 ms at the median and 30-60 ms at
p99 though the handler itself is trivial. A probe needs none of it: its answer is a
function of the lifecycle phase and the engine's health (``server.probes``). This
middleware sends it in two ASGI messages from hypercorn's own task, with the same
``X-Request-Id`` and CORS headers as every other response. Everything else (other paths,
other methods, websockets, lifespan) goes to Quart untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.cors import CorsPolicy
from server.probes import PROBES
from server.request_id import HEADER as REQUEST_ID_HEADER
from server.request_id import choose_request_id
from server.lifecycle import RuntimeLifecycle

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBE_METHODS = frozenset({"GET", "HEAD"})


class ProbeFastPath:
    def __init__(self, inner: ASGIApp, lifecycle: RuntimeLifecycle, cors: CorsPolicy) -> None:
        self._inner = inner
        self._lifecycle = lifecycle
        self._cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        probe = PROBES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if probe is None or scope["method"] not in PROBE_METHODS:
            await self._inner(scope, receive, send)
            return
        answer = probe(self._lifecycle)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(answer.body)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in answer.headers.items()),
            *self._common_headers(scope),
        ]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        body = b"" if scope["method"] == "HEAD" else answer.body
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _common_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """X-Request-Id (echoed when sane, else new) and CORS headers, as on every response."""
        request_headers = {name.lower(): value for name, value in scope.get("headers", ())}
        presented = request_headers.get(REQUEST_ID_HEADER.lower().encode())
        request_id = choose_request_id(presented.decode("latin-1") if presented is not None else None)
        headers = [(REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        origin = request_headers.get(b"origin")
        cors = self._cors.response_headers(origin.decode("latin-1") if origin is not None else None)
        headers.extend((name.lower().encode(), value.encode()) for name, value in cors)
        return headers
