"""A probe answered inside the HTTP/1.1 protocol: no app task, no queue, no ASGI messages.

hypercorn hands every request to an ``HTTPStream`` that spawns an app task and feeds it
through a memory channel; the app (even ``server.probe_fast_path`` in front of Quart)
then replies from that task in a later scheduler pass. A probe's reply is a function of
in-memory state (``server.probes``), so ``ProbeStream`` takes the stream's place and
writes the reply from the connection's own read task, in the same pass that read the
request (one write: ``FastH11Protocol`` sends the head with the body).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from time import time
from typing import Any

from hypercorn.protocol.events import Body, EndBody, Event, Response, StreamClosed

from server.probes import ProbeResponder


class ProbeStream:
    """Stands in for hypercorn's ``HTTPStream`` for one probe request.

    The reply is sent when the request has ended (``EndBody``), as an app would; a
    request body, if any, is ignored. ``on_reply`` (if given) is called just before the
    reply is written.
    """

    def __init__(
        self,
        responder: ProbeResponder,
        config: Any,
        send: Callable[[Event], Awaitable[None]],
        stream_id: int,
        *,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        scope: Callable[[], dict[str, Any]],
        on_reply: Callable[[], None] | None = None,
    ) -> None:
        self._responder = responder
        self._config = config
        self._send = send
        self._stream_id = stream_id
        self._method = method
        self._path = path
        self._headers = headers
        self._scope = scope
        self._on_reply = on_reply
        self._start_time = time()
        self.closed = False

    @property
    def idle(self) -> bool:
        return False

    async def handle(self, event: Event) -> None:
        """Reply at ``EndBody``; ignore body data; ``StreamClosed`` ends the stream.

        Cancellation: as the connection's writes (they are shielded)."""
        if self.closed:
            return
        if isinstance(event, StreamClosed):
            self.closed = True
        elif isinstance(event, EndBody):
            await self._reply()

    async def _reply(self) -> None:
        reply = self._responder.reply(self._method, self._path, self._headers)
        if self._on_reply is not None:
            self._on_reply()
        await self._send(
            Response(
                stream_id=self._stream_id,
                headers=reply.headers,
                status_code=reply.status,
            )
        )
        if reply.body:
            await self._send(Body(stream_id=self._stream_id, data=reply.body))
        await self._send(EndBody(stream_id=self._stream_id))
        if self._config.log.access_logger is not None:
            response = {
                "type": "http.response.start",
                "status": reply.status,
                "headers": reply.headers,
            }
            await self._config.log.access(self._scope(), response, time() - self._start_time)
        await self._send(StreamClosed(stream_id=self._stream_id))
