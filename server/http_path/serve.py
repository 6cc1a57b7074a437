"""``serve``: hypercorn's trio ``worker_serve`` with ``FastTCPServer`` connections.

hypercorn's ``worker_serve`` names its ``TCPServer`` directly, so using a subclass means
owning this loop: the same lifespan, sockets, TLS listeners, shutdown trigger and graceful
deadline, plus (a) connections kept in a set so that idle ones are closed at shutdown
(``FastTCPServer.close_if_idle``, in place of hypercorn's per-connection idle task),
(b) the task that accepts a connection serves it (``_accept_then_serve``: one pass less
on a fresh connection), (c) plain TCP listeners whose ``accept`` does not yield when a
connection is waiting (``PromptAcceptListener``: one more), (d) every connection waiting
in the kernel's queue accepted in one pass, as asyncio's loop does (trio's accept loop
takes one per pass, so a probe behind a wave of new connections waited a pass per
connection ahead of it) and (e) the pass at which each connection was accepted, for
``ProbePassLog``. With ``probe_lane`` (``vlserve serve``'s default), the plain-TCP
listeners belong to a ``ProbeLane`` instead: a process of its own (``LaneProcess``, with
``lane_process``) or a thread, which accepts, answers probes off the event loop, and hands
every other connection to this loop with the bytes it read (``_start_serving``). QUIC (HTTP/3) is not served here: with ``quic_bind`` set, use
``hypercorn.trio.serve``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from random import randint
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from server.http_path.connection import FastTCPServer
from server.http_path.lane_process import LaneProcess
from server.http_path.probe_lane import ACCEPT_CAPACITY_ERRNOS, ACCEPT_RETRY_S, ProbeLane, lane_applies
from server.http_path.probe_passes import ProbePassLog
from server.probes import ProbeResponder

log = logging.getLogger(__name__)

# Connections taken from the kernel's queue in one pass at most (each is an accept(2) and a
# task start, tens of microseconds): the rest are taken in the next pass.
MAX_ACCEPTS_PER_PASS = 64


async def serve(
    app: Any,
    config: Config,
    *,
    probes: ProbeResponder | None = None,
    pass_log: ProbePassLog | None = None,
    probe_lane: bool = False,
    lane_process: bool = False,
    watch_phase: Callable[[Callable[[], None]], None] | None = None,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` as ``hypercorn.trio.serve`` does, on ``FastTCPServer``s.

    ``probes`` (if given) answers probe requests inside the HTTP/1.1 protocol, and with
    ``probe_lane`` (where ``lane_applies``) on plain-TCP connections from a ``ProbeLane``:
    a thread of this process, or with ``lane_process`` a process of its own
    (``server.http_path.lane_process``; ``watch_phase(callback)`` has it told of every
    phase change); ``pass_log`` (if given) records their scheduler passes (0 for the lane's).
    Reports the bound URLs through
    ``task_status``. Returns after ``shutdown_trigger`` returns and in-flight requests
    finished (or ``config.graceful_timeout`` passed).

    Cancellation: stops at once, like hypercorn's: connections are closed, the app's
    lifespan shutdown does not run.
    """
    if config.quic_bind:
        raise ValueError("server.http_path.serve does not serve QUIC; use hypercorn.trio.serve")
    config.set_statsd_logger_class(StatsdLogger)
    app = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)
    connections: set[FastTCPServer] = set()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            use_lane = probe_lane and probes is not None and lane_applies(config)
            listeners, lane_sockets, binds = await _listeners(config, lane=use_lane)
            new_connection = partial(
                FastTCPServer,
                app,
                config,
                context,
                ConnectionState(lifespan_state.copy()),
                connections=connections,
                probes=probes,
                pass_log=pass_log,
            )
            for listener in listeners:
                server_nursery.start_soon(
                    _accept_then_serve,
                    listener,
                    server_nursery,
                    new_connection,
                    pass_log,
                )
            lane: ProbeLane | LaneProcess | None = None
            if lane_sockets and probes is not None and lane_process:
                lane = LaneProcess(
                    lane_sockets,
                    probes,
                    config,
                    serve_connection=partial(_start_serving, server_nursery, new_connection, pass_log),
                    take_back=partial(_take_back, listeners, server_nursery, new_connection, pass_log),
                    watch_phase=watch_phase,
                )
                if pass_log is not None:
                    pass_log.off_loop_counts.append(lane.probe_counts)
                server_nursery.start_soon(lane.run)
            elif lane_sockets and probes is not None:
                hand_over = partial(
                    _hand_over,
                    trio.lowlevel.current_trio_token(),
                    server_nursery,
                    new_connection,
                    pass_log,
                )
                on_probe = pass_log.record_off_loop if pass_log is not None else None
                lane = ProbeLane(lane_sockets, probes, config, hand_over, on_probe)
                server_nursery.start_soon(lane.run)
            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None  # the real errors, without the shutdown signal beside them
            finally:
                await _close_listeners(listeners)
                if lane is not None:
                    lane.close()  # its thread (or process) closes its sockets, then it returns
                await context.terminated.set()
                for connection in list(connections):
                    connection.close_if_idle()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _listeners(
    config: Config, *, lane: bool
) -> tuple[list[trio.abc.Listener[Any]], list[socket.socket], list[str]]:
    """hypercorn's listeners for ``config``'s TCP binds (TLS where configured), the
    plain-TCP sockets left to a ``ProbeLane`` instead (with ``lane``), and their URLs."""
    sockets = config.create_sockets()
    ssl_context = config.create_ssl_context()
    listeners: list[trio.abc.Listener[Any]] = []
    lane_sockets: list[socket.socket] = []
    binds = []
    for sock in sockets.secure_sockets:
        sock.listen(config.backlog)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        listeners.append(trio.SSLListener(listener, ssl_context, https_compatible=True))
        bind = f"https://{repr_socket_addr(sock.family, sock.getsockname())}"
        binds.append(bind)
        await config.log.info(f"Running on {bind} (CTRL + C to quit)")
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        if lane:
            lane_sockets.append(sock)
        else:
            listeners.append(PromptAcceptListener(sock))
        bind = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
        binds.append(bind)
        await config.log.info(f"Running on {bind} (CTRL + C to quit)")
    return listeners, lane_sockets, binds


# accept() errors that concern only the connection being accepted (as trio ignores them)
_IGNORED_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EPERM",
    )
    if hasattr(errno, name)
)


class PromptAcceptListener(trio.abc.Listener[trio.SocketStream]):
    """trio's ``SocketListener`` (which cannot be subclassed) with an ``accept`` that returns at
    once when a connection waits.

    trio's ``accept`` ends with a cancel-shielded checkpoint even when the kernel already
    had the connection, so the new connection's first read (and a probe's reply) waits one
    more scheduler pass; under a burst a pass lasts milliseconds and a probe on a fresh
    connection, which Kubernetes opens every time, pays it on every probe. This ``accept``
    takes a waiting connection without yielding and waits (a checkpoint) only when there is
    none. Closing the listener wakes a waiting ``accept`` with ``ClosedResourceError``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._listening = sock

    async def accept(self) -> trio.SocketStream:
        while True:
            try:
                return self.accept_nowait()
            except trio.WouldBlock:
                await trio.lowlevel.wait_readable(self._listening)

    def accept_nowait(self) -> trio.SocketStream:
        """A connection waiting in the kernel's queue, taken without a checkpoint; raises
        ``trio.WouldBlock`` when none waits and ``ClosedResourceError`` once closed."""
        while True:
            if self._listener.socket.fileno() == -1:
                raise trio.ClosedResourceError("the listener was closed")
            try:
                connection, _ = self._listening.accept()
            except BlockingIOError:
                raise trio.WouldBlock from None
            except OSError as exc:
                if exc.errno in _IGNORED_ACCEPT_ERRNOS:
                    continue
                raise
            return trio.SocketStream(trio.socket.from_stdlib_socket(connection))

    async def aclose(self) -> None:
        await self._listener.aclose()


async def _accept_then_serve(
    listener: trio.abc.Listener[Any],
    nursery: trio.Nursery,
    new_connection: Callable[..., FastTCPServer],
    pass_log: ProbePassLog | None,
) -> None:
    """Accept one connection, then every other one already waiting (up to
    ``MAX_ACCEPTS_PER_PASS`` in all, each served by a task of its own), hand accepting over
    to a new task, and serve the first connection in this one; return when the listener is
    closed.

    ``trio.serve_listeners`` accepts in one task and starts each connection's task with
    ``start_soon``: the connection's first read waits for the next scheduler pass. Here
    the task that accepted reads at once, so a request already sent (a probe on a fresh
    connection) is answered in the pass that accepted it. And it accepts one connection per
    pass: when a wave of clients connects at once, a probe queued behind N of them waited N
    passes before its accept. Here the whole queue is taken in one pass, as asyncio's loop
    does, so every waiting connection is read by the next pass at the latest.

    Cancellation: stops accepting; a connection being served is closed.
    """
    while True:
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return  # shutting down: serve closed the listener
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error(
                "accept returned %s; retrying in %s s",
                os.strerror(exc.errno),
                ACCEPT_RETRY_S,
            )
            await trio.sleep(ACCEPT_RETRY_S)
        else:
            break
    accepted_pass = pass_log.counter.passes if pass_log is not None else 0
    if isinstance(listener, PromptAcceptListener):
        for _ in range(MAX_ACCEPTS_PER_PASS - 1):
            try:
                waiting = listener.accept_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError):
                break
            except OSError:
                break  # the next accept task meets the error again and handles it
            nursery.start_soon(_serve_connection, waiting, new_connection, accepted_pass)
    nursery.start_soon(_accept_then_serve, listener, nursery, new_connection, pass_log)
    await _serve_connection(stream, new_connection, accepted_pass)


async def _serve_connection(
    stream: trio.abc.Stream,
    new_connection: Callable[..., FastTCPServer],
    accepted_pass: int,
    initial: bytes = b"",
) -> None:
    """Serve one accepted connection until it ends (``initial``: its first bytes, already
    read by a ``ProbeLane``), then close it.

    Cancellation: the connection is closed."""
    try:
        await new_connection(stream, accepted_pass=accepted_pass, initial=initial).run()
    finally:
        await trio.aclose_forcefully(stream)


def _start_serving(
    nursery: trio.Nursery,
    new_connection: Callable[..., FastTCPServer],
    pass_log: ProbePassLog | None,
    sock: socket.socket,
    initial: bytes,
) -> None:
    """On the loop: serve ``sock`` (handed over by a probe lane) from ``initial`` on, in a
    task of ``nursery``; the socket is closed if that cannot start. Never raises."""
    try:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        accepted_pass = pass_log.counter.passes if pass_log is not None else 0
        nursery.start_soon(_serve_connection, stream, new_connection, accepted_pass, initial)
    except (OSError, RuntimeError):  # reset meanwhile, or serving has ended
        sock.close()


def _hand_over(
    token: trio.lowlevel.TrioToken,
    nursery: trio.Nursery,
    new_connection: Callable[..., FastTCPServer],
    pass_log: ProbePassLog | None,
    sock: socket.socket,
    initial: bytes,
) -> None:
    """Called in a ``ProbeLane``'s thread: have the loop serve ``sock`` from ``initial``
    on. Returns at once (the lane never waits for the loop); the socket is closed if the
    loop has stopped."""
    try:
        token.run_sync_soon(_start_serving, nursery, new_connection, pass_log, sock, initial)
    except trio.RunFinishedError:
        sock.close()


def _take_back(
    listeners: list[trio.abc.Listener[Any]],
    nursery: trio.Nursery,
    new_connection: Callable[..., FastTCPServer],
    pass_log: ProbePassLog | None,
    sockets: list[socket.socket],
) -> None:
    """On the loop, after a lane process died: accept on ``sockets`` here, as without a
    lane; they join ``listeners`` (closed at shutdown)."""
    for sock in sockets:
        listener = PromptAcceptListener(sock)
        listeners.append(listener)
        nursery.start_soon(_accept_then_serve, listener, nursery, new_connection, pass_log)


async def _close_listeners(listeners: list[trio.abc.Listener[Any]]) -> None:
    """Close every listener (the task waiting in ``accept`` then returns). Not cancellable."""
    with trio.CancelScope(shield=True):
        for listener in listeners:
            await listener.aclose()
