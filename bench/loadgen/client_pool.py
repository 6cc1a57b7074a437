"""The load generator's HTTP clients: one per request in flight, each keeping one connection.

One httpx client shared by every request cost the load generator CPU that grew with the
concurrency: httpcore's pool assigns requests to connections in Python, scanning its
connections on every request and response. On a 2-core machine, streaming 32-token chats,
it used about 7 ms of CPU per request at 32 concurrent requests and 20-33 ms at 128: CPU
taken from the server under test, and a throttle on how fast requests reached it (the
engine then ran smaller batches, so even the server's CPU per request rose). With a client
of its own per concurrent request, as a crowd of users connects, it stays about 6 ms at
128 (bench/README, "A load generator that keeps up").

The clients share one TLS context: httpx builds one per client otherwise (about 50 ms of
CPU each), although the benchmark speaks plain HTTP.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import trio


class ClientPool:
    """``size`` clients, each lent to one request at a time."""

    def __init__(self, clients: list[httpx.AsyncClient]) -> None:
        self._return, self._free = trio.open_memory_channel[httpx.AsyncClient](len(clients))
        for client in clients:
            self._return.send_nowait(client)

    @classmethod
    @asynccontextmanager
    async def open(cls, base_url: str, size: int, timeout: httpx.Timeout) -> AsyncIterator[ClientPool]:
        """``size`` clients of ``base_url``, each with at most one connection, closed when
        the block exits (cancellation too)."""
        verify = ssl.create_default_context()
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout, verify=verify)
                )
                for _ in range(size)
            ]
            yield cls(clients)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client no other request is using, for the block; waits while all are lent
        (the drivers never start more requests than the pool's size, so it does not).
        Cancellation: while waiting, nothing was taken; the client is always given back."""
        client = await self._free.receive()
        try:
            yield client
        finally:
            self._return.send_nowait(client)
