"""Server-sent events as OpenAI streams them, and the streaming response that carries them.

A stream is ``data: <json>\\n\\n`` events, then ``data: [DONE]\\n\\n``. The events are made
by a *producer* task that runs in a nursery owned by the response body while Quart sends
the body. The producer puts encoded events into an ``EventOutbox`` without yielding;
Quart's send loop takes everything pending as one body chunk, so the events that one
engine step makes for a request (every choice's delta, a finish chunk, the usage chunk
and ``[DONE]``) reach the socket in one write, and a chunk costs no task switch of its own
(a zero-buffer channel cost one pass per chunk). A client that reads slowly lets the
outbox fill up to ``OUTBOX_HIGH_WATER`` bytes; then the producer waits, and the engine
coalesces deltas meanwhile instead of the outbox growing without bound.

The body is entered and left by Quart in the handler's task; when the client goes away
the send loop is cancelled, the body's nursery is cancelled with it, and the producer's
``engine.open_stream`` blocks abort their sequences.

A producer that raises an ``Exception`` ends the stream with an error event and
``[DONE]`` rather than a truncated body; the error is logged and its text is not sent
(except for ``InvalidRequest``, whose message is meant for the client).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import orjson
import trio
from pydantic import BaseModel
from quart import Response
from quart.wrappers.response import ResponseBody

from vl.errors import InvalidRequest

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
# Bytes of events a producer may have waiting for the client before it waits itself:
# far more than one engine step's chunks for a request, far less than a long response.
OUTBOX_HIGH_WATER = 64 * 1024

SendEvent = Callable[[BaseModel | dict[str, Any]], Awaitable[None]]
Producer = Callable[[SendEvent], Awaitable[None]]


def encode_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON (UTF-8, not ASCII-escaped)."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json().encode()
    else:
        text = orjson.dumps(payload)
    return b"data: " + text + b"\n\n"


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


@dataclass(frozen=True)
class OutboxStatistics:
    pending_bytes: int
    events: int
    writes: int
    closed: bool


class EventOutbox:
    """Encoded events on their way from one producer to one response body.

    ``put`` never blocks; ``take`` returns everything put since the last ``take`` as one
    chunk. Event loop only.
    """

    def __init__(self, high_water: int = OUTBOX_HIGH_WATER) -> None:
        self._high_water = high_water
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._closed = False
        self._events = 0
        self._writes = 0
        self._takers = trio.lowlevel.ParkingLot()
        self._putters = trio.lowlevel.ParkingLot()

    def put(self, event: bytes) -> None:
        """Queue ``event`` and wake the taker. Raises ``trio.ClosedResourceError`` once closed."""
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        self._pending.append(event)
        self._pending_bytes += len(event)
        self._events += 1
        if self._takers:
            self._takers.unpark_all()

    async def wait_for_room(self) -> None:
        """Return at once while fewer than ``high_water`` bytes are pending (no checkpoint:
        the producer yields when it waits for its next delta); else wait until the taker
        has taken them.

        Cancellation: safe, nothing is lost.
        """
        while self._pending_bytes >= self._high_water and not self._closed:
            await self._putters.park()

    def close(self) -> None:
        """No more events: ``take`` returns what is pending, then reports the end. Idempotent."""
        self._closed = True
        self._takers.unpark_all()
        self._putters.unpark_all()

    async def take(self) -> bytes:
        """Everything pending as one chunk, waiting for something if nothing is; raises
        ``trio.EndOfChannel`` once the outbox is closed and empty. Does not checkpoint
        when events are pending (the caller's write does).

        Cancellation: safe; pending events stay for the next ``take``.
        """
        while not self._pending:
            if self._closed:
                raise trio.EndOfChannel
            await self._takers.park()
        pending = self._pending
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_bytes = 0
        self._writes += 1
        if self._putters:
            self._putters.unpark_all()
        return chunk

    def statistics(self) -> OutboxStatistics:
        """``events`` put and ``writes`` (chunks) taken so far."""
        return OutboxStatistics(
            pending_bytes=self._pending_bytes,
            events=self._events,
            writes=self._writes,
            closed=self._closed,
        )


class ProducedEventsBody(ResponseBody):
    """A response body whose bytes come from ``producer`` running in the body's nursery.

    Quart does ``async with body as it: async for chunk in it: send(chunk)`` in one task;
    entering starts the producer, each iteration takes every event it has put since the
    last one, leaving cancels whatever of it is still running.
    """

    def __init__(self, producer: Producer, request_id: str, outbox: EventOutbox | None = None) -> None:
        self._producer = producer
        self._request_id = request_id
        self.outbox = outbox or EventOutbox()
        self._stack = AsyncExitStack()
        self._cancel_scope: trio.CancelScope | None = None

    async def __aenter__(self) -> Self:
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._cancel_scope = nursery.cancel_scope
        nursery.start_soon(self._produce)
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

    def __aiter__(self) -> ProducedEventsBody:
        if self._cancel_scope is None:
            raise RuntimeError("iterate the body inside 'async with'")
        return self

    async def __anext__(self) -> bytes:
        """The events put since the last chunk, as one chunk. Cancellation: safe."""
        try:
            return await self.outbox.take()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def _produce(self) -> None:
        outbox = self.outbox

        async def send_event(payload: BaseModel | dict[str, Any]) -> None:
            await outbox.wait_for_room()
            outbox.put(encode_event(payload))

        try:
            try:
                await self._producer(send_event)
            except Exception as error:
                if client_error(error) is None:
                    log.error("stream %s failed", self._request_id, exc_info=error)
                outbox.put(error_event(error))
            outbox.put(DONE)
        finally:
            outbox.close()


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
