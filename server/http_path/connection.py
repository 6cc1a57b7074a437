"""hypercorn's trio ``TCPServer`` (one connection) with fewer scheduler passes per request.

Every change keeps hypercorn's behaviour (keep-alive timeout, closing at shutdown, write
shielding, back-pressure) and removes passes a request waits for:

- Reading: the first attempt reads the socket without a checkpoint; a checkpoint follows
  the handling of data that did not have to be waited for. ``receive_some`` checkpoints
  *before* handling data that is already there (the first read of a fresh connection,
  a body arriving behind its head): one pass between the bytes and the reply.
- Idle timer: the keep-alive timeout is the deadline of the read's own cancel scope,
  set and cleared by assignment. hypercorn runs it as a task restarted through a
  ``trio.Lock`` (a pass even when free) and ``nursery.start`` (two more), and stopped
  through the lock again: three to four passes per request, three on a fresh connection
  before its first read. Closing idle connections at shutdown (hypercorn's idle task
  waits on ``context.terminated``) is ``close_if_idle``, called by ``server.http_path.serve``.
- Writing: the send lock is taken without a checkpoint when it is free (``trio.Lock``
  yields a pass even then), empty writes are skipped (``send_all(b"")`` is a pass), and
  a write the kernel's socket buffer takes whole returns without a checkpoint (trio's
  ``send_all`` yields a pass after every write, so a streamed response's task ran two
  steps per event, the second only to return from the write); the rest of a write that
  does not fit goes through ``send_all``, shielded, as in hypercorn.
- The app's queue is fed without a checkpoint (``NoWaitTaskGroup``), and the HTTP/1.1
  protocol writes each response once (``FastH11Protocol``).
"""

from __future__ import annotations

import errno
import os
from math import inf
from typing import Any

import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr

from server.http_path.probe_passes import ProbePassLog
from server.http_path.protocol import FastProtocolWrapper, ProbeHooks
from server.http_path.task_group import NoWaitTaskGroup
from server.probes import ProbeResponder


class FastTCPServer(TCPServer):
    """See the module docstring. ``connections`` is the serving loop's set of live
    connections (for ``close_if_idle`` at shutdown); ``probes`` answers probes in the
    protocol (``None``: through the app); ``pass_log`` (if given) records each probe's
    passes, ``accepted_pass`` being its counter's value when the connection was accepted;
    ``initial`` is what a ``ProbeLane`` read from it before handing it over, handled as the
    first read."""

    def __init__(
        self,
        app: Any,
        config: Any,
        context: Any,
        state: Any,
        stream: Any,
        *,
        connections: set[FastTCPServer],
        probes: ProbeResponder | None = None,
        pass_log: ProbePassLog | None = None,
        accepted_pass: int = 0,
        initial: bytes = b"",
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self._initial = initial
        self._connections = connections
        self._probes = probes
        self._pass_log = pass_log
        self.accepted_pass = accepted_pass
        self.read_pass = accepted_pass
        self._read_once = False
        self._idle_deadline = inf
        self._read_scope: trio.CancelScope | None = None
        # the plain socket, read and written without a checkpoint first (None for TLS)
        self._socket: Any = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def run(self) -> None:
        """hypercorn's ``run`` without the idle task (see the module docstring).

        Cancellation: as hypercorn's: the connection is closed."""
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            alpn_protocol = self.stream.selected_alpn_protocol()
            socket = self.stream.transport_stream.socket
            ssl = True
        except AttributeError:  # not TLS
            alpn_protocol = "http/1.1"
            socket = self.stream.socket
            ssl = False

        self._connections.add(self)
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with NoWaitTaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = FastProtocolWrapper(
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                    alpn_protocol,
                    probes=self._protocol_probes(),
                )
                await self.protocol.initiate()
                self._set_idle(True)  # hypercorn starts the keep-alive timer here too
                await self._read_data()
        except OSError:
            pass
        finally:
            self._connections.discard(self)
            await self._close()

    def _protocol_probes(self) -> ProbeHooks | None:
        if self._probes is None:
            return None
        pass_log = self._pass_log
        if pass_log is None:
            return ProbeHooks(self._probes)

        def on_reply(fresh: bool) -> None:
            pass_log.record(fresh=fresh, since_pass=self.read_pass)

        return ProbeHooks(self._probes, on_reply)

    async def protocol_send(self, event: Any) -> None:
        """hypercorn's ``protocol_send`` with the changes in the module docstring.

        Cancellation: writes are shielded, as in hypercorn; waiting for the send lock
        (another task writing) is cancellable. A write the socket takes whole has no
        checkpoint at all, so a cancellation is seen at the caller's next one."""
        if isinstance(event, RawData):
            if not event.data:
                return
            try:
                self.send_lock.acquire_nowait()
            except trio.WouldBlock:
                await self.send_lock.acquire()
            try:
                try:
                    rest = self._send_nowait(event.data)
                    if rest:
                        with trio.CancelScope(shield=True):
                            await self.stream.send_all(rest)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
            finally:
                self.send_lock.release()
        elif isinstance(event, Closed):
            await self._close()
            await self.protocol.handle(Closed())
        elif isinstance(event, Updated):
            self._set_idle(event.idle)

    def close_if_idle(self) -> None:
        """Close the connection now if it is idle (at shutdown; busy ones close after
        their response, as hypercorn's recycle checks ``context.terminated``)."""
        if self._idle_deadline != inf:
            self._set_deadline(-inf)

    def _set_idle(self, idle: bool) -> None:
        if not idle:
            self._set_deadline(inf)
        elif self.context.terminated.is_set():
            self._set_deadline(-inf)
        else:
            self._set_deadline(trio.current_time() + self.config.keep_alive_timeout)

    def _set_deadline(self, deadline: float) -> None:
        self._idle_deadline = deadline
        if self._read_scope is not None:
            self._read_scope.deadline = deadline

    async def _read_data(self) -> None:
        """Read and handle until EOF, an error, the read timeout or the keep-alive timeout.

        Cancellation: stops reading; the connection is then closed by ``run``."""
        while True:
            try:
                with trio.fail_after(self.config.read_timeout or inf):
                    with trio.CancelScope(deadline=self._idle_deadline) as idle_scope:
                        self._read_scope = idle_scope
                        try:
                            data, waited = await self._receive()
                        finally:
                            self._read_scope = None
                if idle_scope.cancelled_caught:
                    break  # idle past keep_alive_timeout, or idle at shutdown
            except (
                trio.ClosedResourceError,
                trio.BrokenResourceError,
                trio.TooSlowError,
            ):
                break
            if self._pass_log is not None and (waited or self._read_once):
                # the first pass that could see these bytes: this one, or for a first
                # read that did not wait, the accept's (ProbePassLog)
                self.read_pass = self._pass_log.counter.passes
            self._read_once = True
            await self.protocol.handle(RawData(data))
            if data == b"":
                break
            if not waited:
                await trio.lowlevel.checkpoint()
        await self.protocol.handle(Closed())

    async def _receive(self) -> tuple[bytes, bool]:
        """Up to ``MAX_RECV`` bytes (``b""`` at EOF), and whether it had to wait for them.

        Cancellation: a checkpoint only when it waits (see the module docstring); raises
        ``Cancelled`` at once if the surrounding scope is already cancelled."""
        if self._initial:
            data, self._initial = self._initial, b""
            return data, False
        if self._socket is None:
            return await self.stream.receive_some(MAX_RECV), True
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            return self._receive_nowait(), False
        except BlockingIOError:
            pass
        while True:
            await trio.lowlevel.wait_readable(self._socket)
            try:
                return self._receive_nowait(), True
            except BlockingIOError:
                pass

    def _send_nowait(self, data: bytes) -> bytes | memoryview:
        """What is left of ``data`` after one non-blocking write: nothing when the socket
        took it all, all of it for TLS or a full socket buffer. Errors as
        ``trio.SocketStream.send_all`` raises them (the caller holds the send lock, so no
        other write can be under way)."""
        if self._socket is None:
            return data
        fd = self._open_fd()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            return data
        except OSError as error:
            raise _trio_error(error) from error
        return memoryview(data)[sent:] if sent < len(data) else b""

    def _receive_nowait(self) -> bytes:
        """One non-blocking read; errors as ``trio.SocketStream.receive_some`` raises them."""
        fd = self._open_fd()
        try:
            return os.read(fd, MAX_RECV)
        except BlockingIOError:
            raise
        except OSError as error:
            raise _trio_error(error) from error

    def _open_fd(self) -> int:
        """The plain socket's descriptor; ``trio.ClosedResourceError`` once it is closed."""
        fd = self._socket.fileno()
        if fd == -1:
            raise trio.ClosedResourceError("socket was already closed")
        return fd


def _trio_error(error: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The error ``trio.SocketStream`` raises for a failed socket call: closed for a bad
    descriptor (closed under us), broken for anything else."""
    if error.errno == errno.EBADF:
        return trio.ClosedResourceError("socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {error}")
