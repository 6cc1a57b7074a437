"""Counting the scheduler passes the server needs for one HTTP request, from a client in
the same trio run.

The client writes its request without yielding (a blocking ``connect`` and ``sendall`` on
loopback, which the kernel completes on its own: like a prober in another process), then
waits for the reply. The passes counted from the write to the moment the whole reply has
been read, less one (the client's own wake-up on the reply), are the server's. Loopback
delivery is synchronous, so the count depends on the code path only; a background timer
can add a pass now and then, which is why callers take the minimum over several requests
(noise only ever adds).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio.testing

from server.scheduler_passes import PassCounter
from tests.server.rawhttp import read_one_response, request_bytes, status_of

CLIENT_WAKE_UP = 1


@asynccontextmanager
async def pass_counter() -> AsyncIterator[PassCounter]:
    counter = PassCounter()
    trio.lowlevel.add_instrument(counter)
    try:
        yield counter
    finally:
        trio.lowlevel.remove_instrument(counter)


class Client:
    """A loopback connection whose writes never yield to the event loop (small requests
    fit the socket buffer); replies are read through a trio stream."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
        self._sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))

    def send_now(self, data: bytes) -> None:
        assert self._sock.send(data) == len(data)


async def keep_alive_passes(base_url: str, path: str, *, repeats: int = 5) -> int:
    """The fewest server passes a ``GET path`` on a warm keep-alive connection needed."""
    client = Client(base_url)
    async with client.stream, pass_counter() as counter:
        client.send_now(request_bytes("GET", path))
        assert status_of(await read_one_response(client.stream, timeout=5)) == 200
        counts = []
        for _ in range(repeats):
            await trio.testing.wait_all_tasks_blocked()
            start = counter.passes
            client.send_now(request_bytes("GET", path))
            response = await read_one_response(client.stream, timeout=5)
            counts.append(counter.passes - start - CLIENT_WAKE_UP)
            assert status_of(response) == 200
    return min(counts)


async def fresh_connection_passes(base_url: str, path: str, *, repeats: int = 5) -> int:
    """The fewest server passes a ``GET path`` on a new connection needed (accept included)."""
    counts = []
    async with pass_counter() as counter:
        for _ in range(repeats):
            await trio.testing.wait_all_tasks_blocked()
            start = counter.passes
            client = Client(base_url)
            client.send_now(request_bytes("GET", path))
            async with client.stream:
                response = await read_one_response(client.stream, timeout=5)
                counts.append(counter.passes - start - CLIENT_WAKE_UP)
            assert status_of(response) == 200
    return min(counts)
