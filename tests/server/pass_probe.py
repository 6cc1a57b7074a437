"""Counting the scheduler passes one HTTP request needs, from a client in the same trio run.

The count runs from just before the client sends the request (for a fresh connection:
before it connects) to the moment it has read the whole response, so it includes the
client's own two passes (its send's trailing checkpoint and its wake-up on the reply)
along with every pass the server needs. Loopback delivery is synchronous, so the count
depends on the code path only; background timers can add a pass now and then, which is
why callers take the minimum over several requests (noise only ever adds).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio.testing

from server.scheduler_passes import PassCounter
from tests.server.rawhttp import read_one_response, request_bytes, status_of


async def connect(base_url: str) -> trio.SocketStream:
    """A TCP connection to ``base_url``'s numeric host and port, made with one socket
    ``connect`` (``trio.open_tcp_stream`` adds passes of its own: happy eyeballs)."""
    parts = urlsplit(base_url)
    sock = trio.socket.socket()
    try:
        await sock.connect((parts.hostname, parts.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@asynccontextmanager
async def pass_counter() -> AsyncIterator[PassCounter]:
    counter = PassCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        yield counter
    finally:
        trio.lowlevel.remove_instrument(counter)


async def keep_alive_passes(base_url: str, path: str, *, repeats: int = 5) -> int:
    """The fewest passes a ``GET path`` on a warm keep-alive connection needed."""
    stream = await connect(base_url)
    async with stream, pass_counter() as counter:
        await stream.send_all(request_bytes("GET", path))
        assert status_of(await read_one_response(stream, timeout=5)) == 200
        counts = []
        for _ in range(repeats):
            await trio.testing.wait_all_tasks_blocked()
            start = counter.passes
            await stream.send_all(request_bytes("GET", path))
            response = await read_one_response(stream, timeout=5)
            counts.append(counter.passes - start)
            assert status_of(response) == 200
    return min(counts)


async def fresh_connection_passes(base_url: str, path: str, *, repeats: int = 5) -> int:
    """The fewest passes a ``GET path`` on a new connection needed (connect included)."""
    counts = []
    async with pass_counter() as counter:
        for _ in range(repeats):
            await trio.testing.wait_all_tasks_blocked()
            start = counter.passes
            stream = await connect(base_url)
            async with stream:
                await stream.send_all(request_bytes("GET", path))
                response = await read_one_response(stream, timeout=5)
                counts.append(counter.passes - start)
            assert status_of(response) == 200
    return min(counts)
