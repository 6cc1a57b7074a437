"""A real HTTP/1.1 server on 127.0.0.1 for image-fetch tests: trio + h11, misbehaving on request.

    routes = {"/cat.png": Route(body=png), "/slow": Route(body=png, delay=0.2), "/hang": Route(hang=True)}
    async with serve_images(routes, log=log) as base_url:   # "http://127.0.0.1:<port>"
        ...

Each ``Route`` can add latency, redirect anywhere (``{base}`` and ``{port}`` in ``redirect_to``
are filled in), hang before answering, send part of a body and hang, stream an endless body,
or claim a ``Content-Length`` its body does not have. A ``RequestLog`` records what arrived,
which responses the client walked away from, and the peak number of concurrent requests.
Leaving the ``async with`` cancels every connection: shutdown is immediate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

_RECEIVE_SIZE = 65536
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError)


@dataclass(frozen=True)
class Route:
    """How the server answers one path. Without options: ``status`` with ``body`` and ``headers``."""

    body: bytes = b""
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/octet-stream"),)
    delay: float = 0.0  # seconds to wait before the response head
    redirect_to: str | None = None  # sends 302 (or `status` if it is a 3xx) with this Location
    hang: bool = False  # never answer; wait until the client goes away
    hang_after_body: bool = False  # send the head (declaring a longer body) and `body`, then hang
    endless_chunk: bytes | None = None  # stream this chunk forever (chunked encoding)
    chunk_interval: float = 0.0  # seconds between endless chunks
    declared_length: int | None = None  # Content-Length to claim, whatever `body` is


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it: target path and lower-cased header names."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class RequestLog:
    """What the server saw. Wait on it instead of sleeping."""

    requests: list[RecordedRequest] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)  # paths whose client left mid-response
    active: int = 0
    max_active: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def paths(self) -> list[str]:
        """Paths requested so far, in arrival order."""
        return [request.path for request in self.requests]

    async def wait_for_request(self, path: str) -> None:
        """Return once a request for ``path`` has arrived."""
        while path not in self.paths():
            await self._changed.wait()

    async def wait_for_disconnect(self, path: str) -> None:
        """Return once a client has gone away while ``path`` was being answered."""
        while path not in self.disconnected:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _started(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._notify()

    def _finished(self) -> None:
        self.active -= 1
        self._notify()

    def _client_left(self, path: str) -> None:
        self.disconnected.append(path)
        self._notify()


@asynccontextmanager
async def serve_images(routes: Mapping[str, Route], *, log: RequestLog | None = None) -> AsyncIterator[str]:
    """Serve ``routes`` on an ephemeral 127.0.0.1 port; yields the base URL.

    Unknown paths get 404. On exit every connection and handler is cancelled.
    """
    log = RequestLog() if log is None else log
    async with trio.open_nursery() as nursery:
        handler = partial(_serve_connection, routes=routes, log=log)
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        try:
            yield _base_url(listeners[0].socket)
        finally:
            nursery.cancel_scope.cancel()


def _base_url(sock: trio.socket.SocketType) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


async def _serve_connection(stream: trio.SocketStream, *, routes: Mapping[str, Route], log: RequestLog) -> None:
    """Answer requests on one keep-alive connection until either side closes it."""
    base = _base_url(stream.socket)
    connection = h11.Connection(h11.SERVER)
    try:
        while True:
            request = await _next_request(stream, connection)
            if request is None:
                return
            path = request.target.decode("ascii")
            recorded = RecordedRequest(
                method=request.method.decode("ascii"),
                path=path,
                headers={name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers},
            )
            log._started(recorded)
            try:
                keep_alive = await _respond(stream, connection, routes.get(path), path, log, base)
            finally:
                log._finished()
            if not keep_alive or connection.our_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except _PEER_GONE:
        return


async def _next_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
    """The next request, with its body read and discarded; ``None`` when the client closed."""
    request = None
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _respond(
    stream: trio.SocketStream, connection: h11.Connection, route: Route | None, path: str, log: RequestLog, base: str
) -> bool:
    """Answer one request as ``route`` says. Returns whether the connection may be reused."""
    if route is None:
        route = Route(body=b"not found", status=404, headers=(("Content-Type", "text/plain"),))
    if route.delay:
        await trio.sleep(route.delay)
    if route.hang:
        await _wait_until_client_leaves(stream, log, path)
        return False
    headers = list(route.headers)
    status = route.status
    if route.redirect_to is not None:
        status = status if 300 <= status < 400 else 302
        port = base.rsplit(":", 1)[1]
        headers.append(("Location", route.redirect_to.format(base=base, port=port)))
    if route.endless_chunk is not None:
        await _send(stream, connection, h11.Response(status_code=status, headers=headers))
        try:
            while True:
                await _send(stream, connection, h11.Data(data=route.endless_chunk))
                await trio.sleep(route.chunk_interval)
        except _PEER_GONE:
            log._client_left(path)
            return False
    if route.declared_length is not None or route.hang_after_body:
        declared = route.declared_length if route.declared_length is not None else len(route.body) + 1
        headers.append(("Content-Length", str(declared)))
        await _send(stream, connection, h11.Response(status_code=status, headers=headers))
        await stream.send_all(route.body)  # raw: h11 would refuse a body that contradicts the header
        await _wait_until_client_leaves(stream, log, path)
        return False
    headers.append(("Content-Length", str(len(route.body))))
    await _send(stream, connection, h11.Response(status_code=status, headers=headers))
    await _send(stream, connection, h11.Data(data=route.body))
    await _send(stream, connection, h11.EndOfMessage())
    return True


async def _send(stream: trio.SocketStream, connection: h11.Connection, event: h11.Event) -> None:
    data = connection.send(event)
    if data:
        await stream.send_all(data)


async def _wait_until_client_leaves(stream: trio.SocketStream, log: RequestLog, path: str) -> None:
    """Block until the client closes or resets the connection, then record it."""
    try:
        while await stream.receive_some(_RECEIVE_SIZE):
            pass
    except _PEER_GONE:
        pass
    log._client_left(path)
