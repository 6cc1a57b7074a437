"""Make quart-trio close connections that should close under hypercorn's trio worker, and
send event streams without a producer task.

Hypercorn delivers ``http.disconnect`` from *inside* the app's final ``send()`` (the one
that ends the response body): finishing the response makes hypercorn close the stream,
which queues ``http.disconnect`` for the app, which makes quart-trio cancel its request
nursery while hypercorn is still in the middle of its own post-response work (recycling
or closing the connection). That cancel lands on hypercorn's work, so ``Connection:
close`` and HTTP/1.0 connections are never closed and idle keep-alive connections are
never reaped. Shielding exactly that final send lets hypercorn finish; every other send,
and the handler itself, stay cancellable, so a client disconnect still aborts work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart.utils import encode_headers
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.wrappers import Response as WerkzeugResponse

from server.sse import send_body

Send = Callable[[Any], Awaitable[None]]


def _is_final_body(message: Any) -> bool:
    return message.get("type") == "http.response.body" and not message.get("more_body", False)


def shield_final_body(send: Send) -> Send:
    """Wrap an ASGI ``send`` so the message ending the response body runs shielded.

    Cancellation: a cancel arriving during the final send takes effect when it returns
    (the send itself only writes buffered bytes and lets hypercorn finish the stream);
    any other send is cancelled as usual.
    """

    async def send_with_shielded_end(message: Any) -> None:
        if _is_final_body(message):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return send_with_shielded_end


class ShieldedFinalSendConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection with the final body send shielded (see module doc).

    Use as the app's ``asgi_http_class``.
    """

    async def _send_response(self, send: Send, response: Any) -> None:  # type: ignore[override]
        """Quart's, with the final body send shielded; the body is sent by
        ``server.sse.send_body``, which runs a one-choice event stream's producer in this
        task (no producer task, no hand-over per chunk)."""
        send = shield_final_body(send)
        if isinstance(response, WerkzeugResponse):
            await super()._send_response(send, response)
            return
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": encode_headers(response.headers)}
        )

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send_body(response.response, write)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
