"""The probe lane in a process of its own: probes share no GIL with the server.

Why: the lane's thread (``server.http_path.probe_lane``) needs the server process's GIL
for the tens of microseconds of each reply, and under a 128-stream not-streamed text burst
the threads holding it (the event loop, young garbage collections of thousands of request
coroutines, 5-8 ms each) kept its probes at 1.6-2.4x a do-nothing process's p99, with
maxima of 33-45 ms (bench/README.md, "The probe lane in a process of its own"). A process
of its own waits only for a core, exactly as that do-nothing process does.

- ``LaneProcess.run`` (the server's side) starts a Python process running ``main`` with
  the plain-TCP listeners, one end of a Unix ``SOCK_SEQPACKET`` socket pair and the
  ``ProbeBoard`` it publishes the probes' facts on (at every phase change and every
  ``PUBLISH_INTERVAL_S``);
- the process (``main``) runs a ``ProbeLane`` that answers ``/health`` and ``/ready`` from the
  board and hands every other connection over as one message: the connection's descriptor
  (``SCM_RIGHTS``) with the bytes it read; the server serves it from those bytes on, as it
  serves a connection the lane's thread hands over;
- the process ends when the server closes its end of the pair (stopping, or dead: the
  kernel closes it then), after closing the listeners and the probe connections it holds.
  It ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches the whole process group, and
  the server decides when probes stop being answered (after its drain grace);
- if the process dies first, the server takes the listeners back and accepts on its event
  loop (probes then answered inside the HTTP/1.1 protocol): probes lose their lane, no
  request is refused;
- a hand-over waits while the socket pair's buffer is full (the server's loop not
  reading it): the lane then waits too, as its probes would on a loop-bound path; no
  connection is dropped for it.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio
from hypercorn.config import Config

from server.cors import CorsPolicy
from server.http_path.probe_board import ProbeBoard
from server.http_path.probe_lane import RECEIVE_SIZE, ProbeLane
from server.probes import ProbeResponder

log = logging.getLogger(__name__)

# How often the server publishes the probes' facts (and so how stale the engine's health
# may be in a lane's answer; phase changes are published at once). As the loop-lag monitor.
PUBLISH_INTERVAL_S = 0.010
# How long the server waits for the process to exit once told to, before killing it.
STOP_SECONDS = 5.0
# Hand-overs taken from the socket per wake-up at most (as ``serve``'s accept).
MAX_HAND_OVERS_PER_WAKE = 64
# The process's command: ``main`` of this module (``-m`` would import it twice, as
# ``server.http_path`` imports it).
_LANE_COMMAND = "import sys; from server.http_path.lane_process import main; sys.exit(main(sys.argv[1:]))"
# A hand-over message: this tag, then the bytes read from the connection.
_CONNECTION = b"C"


@dataclass(frozen=True)
class LaneSpec:
    """What the lane process is started with (JSON on its command line): descriptors it
    inherits, and the hypercorn and CORS settings its replies follow."""

    listener_fds: list[int]
    channel_fd: int
    board_fd: int
    keep_alive_timeout: float
    keep_alive_max_requests: int
    h11_max_incomplete_size: int
    include_date_header: bool
    include_server_header: bool
    alt_svc_headers: list[str]
    cors_allow_origins: list[str]

    def hypercorn_config(self) -> Config:
        """A hypercorn ``Config`` with the settings the lane reads."""
        config = Config()
        config.keep_alive_timeout = self.keep_alive_timeout
        config.keep_alive_max_requests = self.keep_alive_max_requests
        config.h11_max_incomplete_size = self.h11_max_incomplete_size
        config.include_date_header = self.include_date_header
        config.include_server_header = self.include_server_header
        config.alt_svc_headers = list(self.alt_svc_headers)
        return config


def _message_size(max_head: int) -> int:
    """The largest hand-over message: the tag, and what a lane reads before handing over
    (a probe-like prefix up to ``max_head`` bytes, and one more read)."""
    return len(_CONNECTION) + max_head + RECEIVE_SIZE


# -- the lane process ------------------------------------------------------------------


def _send_connection(channel: socket.socket, sock: socket.socket, initial: bytes) -> None:
    """Pass ``sock`` (and ``initial``, the bytes read from it) to the server, then close the
    lane's copy. If the server is gone the connection is just closed (the lane stops at
    its next wake-up: the channel reads end of stream)."""
    try:
        socket.send_fds(channel, [_CONNECTION + initial], [sock.fileno()])
    except OSError:
        pass
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    """The lane process: serve until the server closes the channel."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec = LaneSpec(**json.loads(argv[0]))
    board = ProbeBoard(spec.board_fd)
    channel = socket.socket(fileno=spec.channel_fd)
    listeners = [socket.socket(fileno=fd) for fd in spec.listener_fds]
    responder = ProbeResponder(board.facts, CorsPolicy(spec.cors_allow_origins))
    lane = ProbeLane(
        listeners,
        responder,
        spec.hypercorn_config(),
        hand_over=lambda sock, initial: _send_connection(channel, sock, initial),
        on_probe=board.count_probe,
        stop_when_readable=channel,
    )
    try:
        lane.serve_forever()
    finally:
        channel.close()
        board.close()
    return 0


# -- the server's side -----------------------------------------------------------------

# serve_connection(sock, initial): the loop serves ``sock`` from ``initial`` on (called on the loop)
ServeConnection = Callable[[socket.socket, bytes], None]
# take_back(sockets): the loop accepts on these listeners itself from now on
TakeBack = Callable[[list[socket.socket]], None]


class LaneProcess:
    """Runs the lane process for ``sockets`` while ``run()`` runs (module docstring)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        responder: ProbeResponder,
        config: Any,
        serve_connection: ServeConnection,
        take_back: TakeBack,
        watch_phase: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        """``watch_phase(callback)`` (if given) has ``callback`` called at every phase
        change, so that the lane never answers from a phase older than the server's."""
        self._sockets = sockets
        self._responder = responder
        self._config = config
        self._serve_connection = serve_connection
        self._take_back = take_back
        self._watch_phase = watch_phase
        self._board: ProbeBoard | None = None
        self._counts_at_exit = (0, 0)
        self._scope = trio.CancelScope()
        self._taken_back = False

    def close(self) -> None:
        """Stop the process (``run`` returns once it has exited). Idempotent; on the loop."""
        self._scope.cancel()

    def probe_counts(self) -> tuple[int, int]:
        """Probes the process answered: (fresh connections, keep-alive ones), also once it
        has stopped."""
        return self._board.probe_counts() if self._board is not None else self._counts_at_exit

    def _publish(self) -> None:
        board = self._board
        if board is not None:
            board.publish(self._responder.facts(), PUBLISH_INTERVAL_S)

    async def run(self) -> None:
        """Start the process, publish the probes' facts and serve the connections it hands
        over until cancelled; if it cannot start, or dies first, hand the listeners back
        (``take_back``) and return.

        Cancellation (and ``close()``): the process is told to stop (its channel closed)
        and waited for (killed after ``STOP_SECONDS``); it closes the listeners and the
        connections it holds before it exits, and this side closes its copies of the
        listeners, so nothing the lane served is left open once this returns."""
        with self._scope:
            await self._run()

    async def _run(self) -> None:
        self._board = board = ProbeBoard.create()
        channel, lane_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = LaneSpec(
            listener_fds=[sock.fileno() for sock in self._sockets],
            channel_fd=lane_end.fileno(),
            board_fd=board.fileno(),
            keep_alive_timeout=self._config.keep_alive_timeout,
            keep_alive_max_requests=self._config.keep_alive_max_requests,
            h11_max_incomplete_size=self._config.h11_max_incomplete_size,
            include_date_header=self._config.include_date_header,
            include_server_header=self._config.include_server_header,
            alt_svc_headers=list(self._config.alt_svc_headers),
            cors_allow_origins=sorted(self._responder.cors.origins),
        )
        process = None
        try:
            self._publish()
            if self._watch_phase is not None:
                self._watch_phase(self._publish)
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-c", _LANE_COMMAND, json.dumps(asdict(spec))],
                    pass_fds=(*spec.listener_fds, lane_end.fileno(), board.fileno()),
                )
            except OSError as error:
                log.error("could not start the probe lane process (%s); probes are answered on the event loop", error)
            else:
                lane_end.close()
                channel.setblocking(False)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._publish_forever)
                    await self._receive(channel)
                    nursery.cancel_scope.cancel()
                log.error("the probe lane process (pid %d) exited; probes are answered on the event loop", process.pid)
            self._taken_back = True
            self._take_back(self._sockets)
        finally:
            if not self._taken_back:
                for sock in self._sockets:  # refuse new connections now, in both processes
                    _stop_listening(sock)
            lane_end.close()
            channel.close()  # the process stops at its next wake-up
            if process is not None:
                with trio.CancelScope(shield=True):
                    await _reap(process)
            self._board = None
            self._counts_at_exit = board.probe_counts()
            board.close()
            if not self._taken_back:
                for sock in self._sockets:
                    sock.close()

    async def _publish_forever(self) -> None:
        """Publish the facts every ``PUBLISH_INTERVAL_S`` (``_run`` published them before
        starting the process). Cancellation: returns."""
        while True:
            await trio.sleep(PUBLISH_INTERVAL_S)
            self._publish()

    async def _receive(self, channel: socket.socket) -> None:
        """Serve every connection the process hands over; return at end of stream (it has
        exited)."""
        size = _message_size(self._config.h11_max_incomplete_size)
        while True:
            await trio.lowlevel.wait_readable(channel)
            for _ in range(MAX_HAND_OVERS_PER_WAKE):
                try:
                    data, fds, flags, _ = socket.recv_fds(channel, size, 1)
                except BlockingIOError:
                    break
                if not data:
                    for fd in fds:
                        socket.socket(fileno=fd).close()
                    return
                connections = [socket.socket(fileno=fd) for fd in fds]
                if len(connections) != 1 or not data.startswith(_CONNECTION) or flags & socket.MSG_TRUNC:
                    log.error("dropped a malformed hand-over from the probe lane process")
                    for sock in connections:
                        sock.close()
                    continue
                self._serve_connection(connections[0], data[len(_CONNECTION) :])


def _stop_listening(sock: socket.socket) -> None:
    """Stop ``sock`` (a listening socket the lane process shares) taking connections, at
    once and for every process holding it: on Linux, ``shutdown`` of a listening socket
    closes its queue (new connections are refused) though the descriptors stay open.
    Closing only this process's descriptor would leave it listening until the lane's
    exits, and a connection queued meanwhile would be reset instead of refused."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected / already closed


async def _reap(process: trio.Process) -> None:
    """Wait for ``process`` to exit (it was told to), killing it after ``STOP_SECONDS``."""
    with trio.move_on_after(STOP_SECONDS):
        await process.wait()
        return
    log.warning("the probe lane process (pid %d) did not stop in %.0f s; killing it", process.pid, STOP_SECONDS)
    process.kill()
    await process.wait()
