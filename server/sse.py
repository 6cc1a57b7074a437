"""Server-sent events as OpenAI streams them, and the streaming response that carries them.

A stream is ``data: <json>\\n\\n`` events, then ``data: [DONE]\\n\\n``. The events are made
by a *producer* task that runs in a nursery owned by the response body while Quart sends
the body; Quart's send loop reads them from a zero-buffer channel, so a slow client holds
the producer back (and the engine coalesces deltas) instead of buffering without bound.
The body is entered and left by Quart in the handler's task; when the client goes away
the send loop is cancelled, the body's nursery is cancelled with it, and the producer's
``engine.open_stream`` blocks abort their sequences.

A producer that raises an ``Exception`` ends the stream with an error event and
``[DONE]`` rather than a truncated body; the error is logged and its text is not sent
(except for ``InvalidRequest``, whose message is meant for the client).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import trio
from pydantic import BaseModel
from quart import Response
from quart.wrappers.response import ResponseBody

from vl.errors import InvalidRequest

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
SendEvent = Callable[[BaseModel | dict[str, Any]], Awaitable[None]]
Producer = Callable[[SendEvent], Awaitable[None]]


def encode_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


def client_error(error: Exception) -> InvalidRequest | None:
    """``error`` itself if it is an ``InvalidRequest``, or the first of a group made only
    of them (several choices refused alike); else ``None``."""
    if isinstance(error, InvalidRequest):
        return error
    if isinstance(error, ExceptionGroup):
        matched, rest = error.split(InvalidRequest)
        if rest is None and matched is not None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, InvalidRequest) else None
    return None


def error_event(error: Exception) -> bytes:
    """The event that ends a stream that failed after it started.

    An ``InvalidRequest`` (raised by the engine on submit) keeps its message; anything
    else is reported without internals.
    """
    invalid = client_error(error)
    if invalid is not None:
        detail = {
            "message": invalid.message,
            "type": "invalid_request_error",
            "param": invalid.param,
            "code": invalid.code,
        }
    else:
        detail = {
            "message": "The server had an error while generating the response.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    return encode_event({"error": detail})


class ProducedEventsBody(ResponseBody):
    """A response body whose bytes come from ``producer`` running in the body's nursery.

    Quart does ``async with body as it: async for chunk in it: send(chunk)`` in one task;
    entering starts the producer, leaving cancels whatever of it is still running.
    """

    def __init__(self, producer: Producer, request_id: str) -> None:
        self._producer = producer
        self._request_id = request_id
        self._stack = AsyncExitStack()
        self._receive: trio.MemoryReceiveChannel[bytes] | None = None
        self._cancel_scope: trio.CancelScope | None = None

    async def __aenter__(self) -> ProducedEventsBody:
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._cancel_scope = nursery.cancel_scope
        send, self._receive = trio.open_memory_channel[bytes](0)
        nursery.start_soon(self._produce, send)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Cancel the producer if it is still running, and wait for it."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        return await self._stack.__aexit__(exc_type, exc_value, tb)

    def __aiter__(self) -> trio.MemoryReceiveChannel[bytes]:
        if self._receive is None:
            raise RuntimeError("iterate the body inside 'async with'")
        return self._receive

    async def _produce(self, send: trio.MemorySendChannel[bytes]) -> None:
        async with send:

            async def send_event(payload: BaseModel | dict[str, Any]) -> None:
                await send.send(encode_event(payload))

            try:
                await self._producer(send_event)
            except Exception as error:
                if client_error(error) is None:
                    log.error("stream %s failed", self._request_id, exc_info=error)
                await send.send(error_event(error))
            await send.send(DONE)


def sse_response(producer: Producer, request_id: str) -> Response:
    """A ``text/event-stream`` response streaming what ``producer`` sends, then ``[DONE]``.

    No response timeout applies to it (streams may run for many minutes).
    """
    response = Response(
        ProducedEventsBody(producer, request_id),
        status=200,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None
    return response
