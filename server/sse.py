"""Server-sent events as OpenAI streams them, and the streaming response that carries them.

A stream is ``data: <json>\\n\\n`` events, then ``data: [DONE]\\n\\n``. A *producer*
coroutine makes the events through an ``EventWriter``: ``send(payload)`` queues one event,
``flush()`` marks the end of what belongs together (the start chunks; everything one
engine delta makes for a choice), so the events of one engine step leave in one socket
write. The response body (``ProducedEventsBody``) runs the producer one of two ways:

- *inline* (one choice, the default for a chat or completion with ``n`` = 1): in the
  task that sends the response (``send_body``, which ``server.connection_fix`` uses for
  every response), each ``flush`` being one ASGI send. A token then costs one task wake-up
  (the stream's consumer) and its write, nothing else;
- *with a producer task* (several choices, which deliver deltas from tasks of their own,
  or a server that iterates the body as Quart does): the producer runs in a nursery owned
  by the body and puts encoded events into an ``EventOutbox`` without yielding; the send
  loop takes everything pending as one body chunk, so the deltas of every choice that one
  engine step made still leave in one write. A client that reads slowly lets the outbox
  fill up to ``OUTBOX_HIGH_WATER`` bytes; then the producer waits, and the engine
  coalesces deltas meanwhile instead of the outbox growing without bound.

Either way the body is entered and left by the handler's task; when the client goes away
that task is cancelled, and with it the producer, whose ``engine.open_stream`` blocks
abort their sequences. A slow client makes the inline producer wait in its write, which
coalesces deltas the same way.

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
from typing import Any, Protocol, Self

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

Payload = BaseModel | dict[str, Any]
Write = Callable[[bytes], Awaitable[None]]


class EventWriter(Protocol):
    """Where a producer sends its events."""

    async def send(self, payload: Payload) -> None:
        """Queue one event. Waits only while the client is far behind."""
        ...

    async def flush(self) -> None:
        """Let the events queued so far leave now, together (one write)."""
        ...


Producer = Callable[[EventWriter], Awaitable[None]]


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


class _OutboxWriter:
    """An ``EventWriter`` into an ``EventOutbox`` (the producer-task way)."""

    def __init__(self, outbox: EventOutbox) -> None:
        self._outbox = outbox

    async def send(self, payload: Payload) -> None:
        await self._outbox.wait_for_room()
        self._outbox.put(encode_event(payload))

    async def flush(self) -> None:
        pass  # the send loop takes whatever is pending whenever it runs

    def put_encoded(self, event: bytes) -> None:
        self._outbox.put(event)


class _InlineWriter:
    """An ``EventWriter`` that writes each flushed group itself (the inline way)."""

    def __init__(self, write: Write) -> None:
        self._write = write
        self._pending: list[bytes] = []
        self.writes = 0

    async def send(self, payload: Payload) -> None:
        self._pending.append(encode_event(payload))

    async def flush(self) -> None:
        if self._pending:
            chunk = b"".join(self._pending)
            self._pending = []
            self.writes += 1
            await self._write(chunk)

    def put_encoded(self, event: bytes) -> None:
        self._pending.append(event)


class ProducedEventsBody(ResponseBody):
    """A response body whose bytes come from ``producer``.

    ``send_body`` runs an ``inline`` body's producer in the calling task. Otherwise (or
    when iterated as Quart does, ``async with body as it: async for chunk in it:
    send(chunk)``) entering starts the producer in the body's nursery, each iteration
    takes every event it has put since the last one, and leaving cancels whatever of it
    is still running.
    """

    def __init__(
        self, producer: Producer, request_id: str, outbox: EventOutbox | None = None, *, inline: bool = False
    ) -> None:
        self._producer = producer
        self._request_id = request_id
        self.inline = inline
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

    async def write_inline(self, write: Write) -> int:
        """Run the producer in this task, writing each flushed group of events with
        ``write``, then ``[DONE]`` (after an error event if the producer failed). Returns
        the number of writes.

        Cancellation: cancels the producer where it waits (its streams abort); nothing is
        written after that.
        """
        writer = _InlineWriter(write)
        await self._run_producer(writer)
        await writer.flush()
        return writer.writes

    async def _produce(self) -> None:
        try:
            await self._run_producer(_OutboxWriter(self.outbox))
        finally:
            self.outbox.close()

    async def _run_producer(self, writer: _OutboxWriter | _InlineWriter) -> None:
        try:
            await self._producer(writer)
        except Exception as error:
            if client_error(error) is None:
                log.error("stream %s failed", self._request_id, exc_info=error)
            writer.put_encoded(error_event(error))
        writer.put_encoded(DONE)


async def send_body(body: Any, write: Write) -> None:
    """Send every chunk of the response body ``body`` with ``write``: an inline
    ``ProducedEventsBody`` runs its producer in this task; any other body is entered and
    iterated as Quart does. Cancellation: as the body's."""
    if isinstance(body, ProducedEventsBody) and body.inline:
        await body.write_inline(write)
        return
    async with body as chunks:
        async for data in chunks:
            await write(data.encode() if isinstance(data, str) else data)


def sse_response(producer: Producer, request_id: str, *, inline: bool = False) -> Response:
    """A ``text/event-stream`` response streaming what ``producer`` sends, then ``[DONE]``;
    ``inline``: the producer sends from one task only, so it may run in the task that
    sends the response (see the module docstring).

    No response timeout applies to it (streams may run for many minutes).
    """
    response = Response(
        ProducedEventsBody(producer, request_id, inline=inline),
        status=200,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None
    return response
