"""``GET``/``HEAD`` ``/health`` and ``/ready`` answered at the ASGI layer, in front of Quart.

Quart-trio handles a request in tasks of its own, with a request context, hooks and a
response object, and each of those steps waits for a turn of the event loop behind every
stream's work: under a 64-stream load ``/health`` took 5 ms at the median and 30-60 ms at
p99 though the handler itself is trivial. A probe needs none of it: its reply comes from
``server.probes.ProbeResponder``, sent in two ASGI messages from the server's own task.
Everything else (other paths, other methods, websockets, lifespan) goes to Quart untouched.

Under ``vlserve serve`` probes are answered earlier still, inside the HTTP/1.1 protocol
(``server.http_path``); this layer serves plain ``hypercorn`` and anything else that
calls the ASGI app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.probes import ProbeResponder

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ProbeFastPath:
    def __init__(self, inner: ASGIApp, responder: ProbeResponder) -> None:
        self._inner = inner
        self.responder = responder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.responder.is_probe(scope["method"], scope.get("path", "")):
            await self._inner(scope, receive, send)
            return
        reply = self.responder.reply(scope["method"], scope["path"], scope.get("headers", ()))
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": reply.headers,
            }
        )
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})
