"""Probes answered off the event loop: a lane of their own owns the plain-TCP listeners.

The lane is a ``ProbeLane`` serving in a process of its own (``vlserve serve``'s default:
``server.http_path.lane_process``, which reads the probes' facts from a shared board) or in
a thread of the server process (``run``; ``--no-probe-lane-process``). Below, "thread" is
whichever runs it.

Why: under a burst the event loop is busy half of a core (reading requests, writing
events), and a probe answered by the loop waits until the loop's thread has a core and
has finished the pass under way, however few passes the probe itself needs (one, on the
protocol path: ``server.http_path.protocol``). A do-nothing server process beside the
burst waits only for a core; the loop's probes stayed 2-3x above it at 128 streams
(bench/README.md, "Probes off the event loop"). So ``ProbeLane`` waits in ``select`` in a
thread of its own, accepts every connection and reads its first bytes:

- a connection whose request is ``GET``/``HEAD`` of ``/health`` or ``/ready`` is answered
  here, from ``server.probes`` (the same replies, headers and rules as the loop's), and
  stays here while it sends only probes (a keep-alive prober's connection, a Kubernetes
  probe's fresh one);
- anything else (the first bytes of any other request, or a probe this reader does not
  understand down to the last header: a body, a query, an ``Expect``, an ``Upgrade``, a
  malformed or oversized head) hands the connection over to the event loop, with the
  bytes read so far, through ``hand_over`` (``server.http_path.serve`` starts a
  ``FastTCPServer`` on it, which parses them as if it had read them itself).

The thread needs the GIL for the tens of microseconds a reply takes; the server process
asks a thread holding it to offer it every ``--switch-interval`` (1 ms). ``/health``
answered here cannot see the event loop itself, so it reads the loop-lag monitor's last
wake-up instead (``server.probes.health_answer``): a loop stalled past
``--health-loop-stall`` seconds makes it 503, as a probe waiting for that loop would
time out.

Keep-alive timeout and ``keep_alive_max_requests`` are hypercorn's, as on the loop.
Not here (hypercorn's path answers these): TLS listeners, and servers whose hypercorn
settings need per-request state of the loop (``max_requests``, ``server_names``,
``h11_pass_raw_headers``; ``lane_applies``).
"""

from __future__ import annotations

import errno
import logging
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from server.probes import PROBE_METHODS, PROBE_PATHS, ProbeReply, ProbeResponder

log = logging.getLogger(__name__)

# Connections taken from a listener's queue per wake-up at most (as ``serve``'s accept).
MAX_ACCEPTS_PER_WAKE = 64
RECEIVE_SIZE = 16384
# As trio.serve_listeners: accept errors that mean "out of resources, retry shortly"
# (``server.http_path.serve``'s accept uses them too).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S = 0.1
# The request line of every request the lane may answer, up to the version's last digit.
_PROBE_LINE_PREFIXES = tuple(
    f"{method} {path} HTTP/1.".encode("ascii") for method in sorted(PROBE_METHODS) for path in sorted(PROBE_PATHS)
)
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A probe carries none of these: a request with one goes to the loop, which knows them.
_HANDED_OVER_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


@dataclass(frozen=True)
class ProbeHead:
    """A complete probe request head: ``size`` bytes of the buffer, header names lower-case."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    close: bool
    size: int


class NeedMore:
    """The buffer is a prefix of a probe's head: read on."""


class HandOver:
    """The buffer is not (or not only) a probe this reader answers: the loop takes it."""


NEED_MORE = NeedMore()
HAND_OVER = HandOver()


def read_probe_head(buffer: bytes, max_head: int) -> ProbeHead | NeedMore | HandOver:
    """Classify the start of ``buffer``: a complete probe head, a prefix of one, or neither.

    Strict by design: a head is a probe only if h11 would read it as exactly that request
    and it has no body (no ``Content-Length`` but ``0``, no ``Transfer-Encoding``); every
    doubt is ``HAND_OVER``, and the loop's full HTTP/1.1 protocol decides."""
    end = buffer.find(b"\r\n\r\n")
    line_end = buffer.find(b"\r\n")
    first_line = buffer if line_end < 0 else buffer[:line_end]
    if not any(prefix.startswith(first_line[: len(prefix)]) for prefix in _PROBE_LINE_PREFIXES):
        return HAND_OVER
    if end < 0:
        if b"\n\n" in buffer.replace(b"\r", b"") or len(buffer) > max_head:
            return HAND_OVER  # a head ended by bare line feeds, or too long for a probe
        return NEED_MORE
    if end + 4 > max_head:
        return HAND_OVER
    lines = buffer[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in _VERSIONS:
        return HAND_OVER
    method, target, version = parts
    path = target.decode("ascii", "replace")
    if method.decode("ascii", "replace") not in PROBE_METHODS or path not in PROBE_PATHS:
        return HAND_OVER
    headers = []
    hosts = 0
    close = version == b"HTTP/1.0"  # h11 keeps no HTTP/1.0 connection alive
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _FORBIDDEN_IN_VALUE.search(value):
            return HAND_OVER  # also an obs-fold line, which starts with a space
        name = name.lower()
        value = value.strip(b" \t")
        if name in _HANDED_OVER_HEADERS or (name == b"content-length" and value != b"0"):
            return HAND_OVER
        if name == b"host":
            hosts += 1
        elif name == b"connection" and b"close" in (token.strip() for token in value.lower().split(b",")):
            close = True
        headers.append((name, value))
    if hosts > 1 or (hosts == 0 and version == b"HTTP/1.1"):
        return HAND_OVER  # h11 answers these 400
    return ProbeHead(method.decode("ascii"), path, headers, close, end + 4)


def reply_bytes(reply: ProbeReply, server_headers: Iterable[tuple[bytes, bytes]], close: bool) -> bytes:
    """``reply`` as h11 writes it on the loop's path: status line without a reason, the
    reply's headers, hypercorn's ``date``/``server`` headers, ``Connection: close`` when
    the connection closes after it, then the body."""
    head = [b"HTTP/1.1 %d \r\n" % reply.status]
    head.extend(b"%s: %s\r\n" % pair for pair in (*reply.headers, *server_headers))
    if close:
        head.append(b"Connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + reply.body


def lane_applies(config: Any) -> bool:
    """Whether hypercorn ``config`` lets probes be answered off the loop (module docstring)."""
    return not (config.max_requests or config.server_names or config.h11_pass_raw_headers)


# hand_over(sock, data): the loop serves ``sock`` from here on, ``data`` being what was read
HandOverFn = Callable[[socket.socket, bytes], None]


@dataclass
class _Connection:
    sock: socket.socket
    deadline: float
    buffer: bytes = b""
    requests: int = 0


class ProbeLane:
    """Owns ``sockets`` (bound, listening plain-TCP sockets) while it serves; see the
    module docstring. ``on_probe(fresh)`` (if given) is called in the lane's thread just
    before each reply is written, ``fresh`` for a connection's first request. Serves in a
    thread of the server process (``run``) or in a process of its own
    (``server.http_path.lane_process`` calls ``serve_forever``, with ``stop_when_readable``:
    the socket whose end of stream, or any byte, stops it)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        responder: ProbeResponder,
        config: Any,
        hand_over: HandOverFn,
        on_probe: Callable[[bool], None] | None = None,
        stop_when_readable: socket.socket | None = None,
    ) -> None:
        self._listeners = sockets
        self._responder = responder
        self._config = config
        self._hand_over = hand_over
        self._on_probe = on_probe
        self._wake_read, self._wake_write = socket.socketpair()
        self._stop_when_readable = stop_when_readable
        self._closing = False
        self._served = False
        self._limiter = trio.CapacityLimiter(1)
        # the thread's own state while it serves (nothing else touches it)
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()
        self._connections: dict[socket.socket, _Connection] = {}

    async def run(self) -> None:
        """Serve in a worker thread (holding the lane's limiter of one) until ``close()``;
        then every socket the lane holds is closed.

        Cancellation: closes the lane and waits for its thread, which returns at once (it
        only ever waits in ``select``, which the close wakes)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_when_cancelled)
                await trio.to_thread.run_sync(self.serve_forever, limiter=self._limiter)
                nursery.cancel_scope.cancel()
        finally:
            if not self._served:  # cancelled before the thread started
                self._release()

    async def _close_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Stop accepting and close every connection the lane holds (idempotent, from any
        thread; returns at once, ``run`` returns once the thread has done it)."""
        if self._closing:
            return
        self._closing = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass  # the thread has already closed its end: it is gone

    def serve_forever(self) -> None:
        """Accept, answer probes and hand other connections over until ``close()`` (or
        ``stop_when_readable`` turns readable); then close every socket the lane holds.
        Blocking: call it in the thread (or process) that is the lane."""
        self._served = True
        selector, connections = self._selector, self._connections
        try:
            selector.register(self._wake_read, selectors.EVENT_READ)
            if self._stop_when_readable is not None:
                selector.register(self._stop_when_readable, selectors.EVENT_READ)
            for listener in self._listeners:
                listener.setblocking(False)
                selector.register(listener, selectors.EVENT_READ)
            while not self._closing:
                now = time.monotonic()
                deadline = min((c.deadline for c in connections.values()), default=None)
                timeout = None if deadline is None else max(0.0, deadline - now)
                for key, _ in selector.select(timeout):
                    sock = key.fileobj
                    if sock is self._wake_read:
                        continue
                    if sock is self._stop_when_readable:
                        self._closing = True
                        break
                    if sock in connections:
                        self._read(connections[sock])
                    else:
                        self._accept(sock)  # type: ignore[arg-type]
                now = time.monotonic()
                for connection in [c for c in connections.values() if c.deadline <= now]:
                    self._drop(connection)  # idle past keep_alive_timeout
        finally:
            for connection in list(connections.values()):
                self._drop(connection)
            self._release()

    def _release(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKE):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in ACCEPT_CAPACITY_ERRNOS:
                    # out of descriptors or memory: the listener stays readable, so wait
                    # (as ``serve``'s accept does) instead of spinning on it
                    log.error("accept returned %s; retrying in %s s", error.strerror, ACCEPT_RETRY_S)
                    time.sleep(ACCEPT_RETRY_S)
                    return
                continue  # the failed connection's own error (as trio ignores them)
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + self._config.keep_alive_timeout)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ)
            self._read(connection)  # the request often came with it

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(connection)
            return
        connection.buffer += data
        while connection.buffer:
            head = read_probe_head(connection.buffer, self._config.h11_max_incomplete_size)
            if head is NEED_MORE:
                return
            if not isinstance(head, ProbeHead):
                self._give_to_loop(connection)
                return
            if not self._reply(connection, head):
                self._drop(connection)
                return
            connection.deadline = time.monotonic() + self._config.keep_alive_timeout

    def _reply(self, connection: _Connection, head: ProbeHead) -> bool:
        """Write the reply to ``head``; whether the connection stays open."""
        connection.buffer = connection.buffer[head.size :]
        connection.requests += 1
        close = head.close or connection.requests >= self._config.keep_alive_max_requests
        reply = self._responder.reply(head.method, head.path, head.headers)
        data = reply_bytes(reply, self._config.response_headers("h11"), close)
        if self._on_probe is not None:
            self._on_probe(connection.requests == 1)
        try:
            sent = connection.sock.send(data)
        except OSError:
            return False
        # a reply of a few hundred bytes fits any socket buffer; one that does not has
        # a client that does not read, and is closed rather than waited for
        return sent == len(data) and not close

    def _give_to_loop(self, connection: _Connection) -> None:
        self._forget(connection)
        self._hand_over(connection.sock, connection.buffer)

    def _drop(self, connection: _Connection) -> None:
        self._forget(connection)
        connection.sock.close()

    def _forget(self, connection: _Connection) -> None:
        self._selector.unregister(connection.sock)
        del self._connections[connection.sock]
