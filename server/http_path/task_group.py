"""hypercorn's trio ``TaskGroup``, feeding the app's receive queue without a checkpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.trio.task_group import TaskGroup, _handle


async def _put(channel: trio.MemorySendChannel[Any], message: Any) -> None:
    """Queue ``message`` for the app; waits only when the queue is full.

    ``MemorySendChannel.send`` yields a scheduler pass even when there is room: one pass
    per request (the request's end) and one more when the response ends (hypercorn queues
    ``http.disconnect`` from inside the app's final send). ``send_nowait`` costs none, and
    a full queue still applies back-pressure through ``send``.

    Cancellation: as ``MemorySendChannel.send`` when the queue is full, else not a
    checkpoint (callers checkpoint elsewhere: the connection's read loop does).
    """
    try:
        channel.send_nowait(message)
    except trio.WouldBlock:
        await channel.send(message)


class NoWaitTaskGroup(TaskGroup):
    """``TaskGroup.spawn_app`` with ``_put`` as the app's queue (see ``_put``)."""

    async def spawn_app(  # type: ignore[override]
        self,
        app: Any,
        config: Any,
        scope: Any,
        send: Callable[[Any], Awaitable[None]],
    ) -> Callable[[Any], Awaitable[None]]:
        app_send_channel, app_receive_channel = trio.open_memory_channel[Any](config.max_app_queue_size)
        self._nursery.start_soon(  # type: ignore[union-attr]
            _handle,
            app,
            config,
            scope,
            app_receive_channel.receive,
            send,
            trio.to_thread.run_sync,
            trio.from_thread.run,
        )
        return partial(_put, app_send_channel)
