"""``ProbeLane`` (server/http_path/probe_lane.py): probes answered by a thread of their own,
every other connection handed to the event loop with the bytes already read.

Which side answered is read from the server's ``ProbePassLog`` (the lane records 0 passes,
the loop 1 or more), so each test can tell a probe answered off the loop from one the loop
answered. Blocking tests block the loop's thread with ``threading.Event.wait`` until a
client thread got its replies: without the lane they would never arrive (the test then
fails after its bound, it does not hang).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from urllib.parse import urlsplit

import h11
import pytest
import trio
from hypercorn.config import Config

from server.config import ServerConfig
from server.cors import CorsPolicy
from server.http_path import ProbePassLog
from server.http_path.probe_lane import (
    HAND_OVER,
    NEED_MORE,
    ProbeHead,
    ProbeLane,
    read_probe_head,
    reply_bytes,
)
from server.lifecycle import RuntimeLifecycle
from server.probes import ProbeResponder, facts_of
from server.scheduler_passes import PassCounter
from server.serve import RunningServer, run_server
from tests.server.fakes import FakeRuntimeFactory
from tests.server.rawhttp import connect, read_one_response, read_until, read_until_eof, request_bytes, status_of

MAX_HEAD = 16384
BLOCKED_LOOP_BOUND_S = 10.0  # how long a test blocks the loop at most before it fails


# -- reading a probe's head ------------------------------------------------------------


def _head(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("latin-1")


@pytest.mark.parametrize(
    ("request_text", "close"),
    [
        ("GET /health HTTP/1.1\nHost: x\n\n", False),
        ("HEAD /ready HTTP/1.1\nhost: x\nConnection: keep-alive, Close\n\n", True),
        ("GET /health HTTP/1.0\n\n", True),  # h11 closes every HTTP/1.0 connection
        ("GET /ready HTTP/1.1\nHost: x\nContent-Length: 0\nX-Request-Id: abc\n\n", False),
    ],
)
def test_a_probe_head_is_read_whole(request_text, close):
    buffer = _head(request_text) + b"POST /next"
    head = read_probe_head(buffer, MAX_HEAD)
    assert isinstance(head, ProbeHead)
    assert (head.method, head.path, head.close) == (request_text.split()[0], request_text.split()[1], close)
    assert buffer[head.size :] == b"POST /next"  # the next request stays in the buffer
    assert all(name == name.lower() for name, _ in head.headers)


@pytest.mark.parametrize("cut", [1, 3, 5, 12, 20, 28])
def test_a_prefix_of_a_probe_needs_more(cut):
    assert read_probe_head(_head("GET /health HTTP/1.1\nHost: x\n\n")[:cut], MAX_HEAD) is NEED_MORE


@pytest.mark.parametrize(
    "buffer",
    [
        b"P",  # any other method, decided on its first byte
        b"GET /v1/models HTTP/1.1\r\n",
        b"GET /healthz",
        b"GET /health?full=1 HTTP/1.1\r\nHost: x\r\n\r\n",  # a query: the loop's parser reads it
        b"GET /%68ealth HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",  # no Host (h11: 400)
        b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\x01\r\n\r\n",
        b"GET /health HTTP/1.1\nHost: x\n\n",  # bare line feeds
        b"GET /health HTTP/1.1\r\nHost: x\n\r\n",  # ... mixed with CRLF
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * MAX_HEAD,  # too long for a probe
    ],
)
def test_anything_but_a_plain_probe_is_handed_over(buffer):
    assert read_probe_head(buffer, MAX_HEAD) is HAND_OVER


def test_a_reply_reads_back_through_h11_as_the_responders_reply():
    lifecycle = RuntimeLifecycle(ServerConfig(), factory=None)  # type: ignore[arg-type]
    responder = ProbeResponder(partial(facts_of, lifecycle), CorsPolicy(("https://a.example",)))
    reply = responder.reply("GET", "/ready", [(b"origin", b"https://a.example"), (b"x-request-id", b"r-1")])
    for close in (False, True):
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/ready", headers=[("Host", "x")]))
        client.receive_data(reply_bytes(reply, [(b"server", b"hypercorn-h11")], close))
        response, data = client.next_event(), client.next_event()
        assert response.status_code == reply.status == 503  # still loading
        assert (b"x-request-id", b"r-1") in list(response.headers)
        assert (b"access-control-allow-origin", b"https://a.example") in list(response.headers)
        assert data.data == reply.body
        assert isinstance(client.next_event(), h11.EndOfMessage)
        assert client.their_state is (h11.MUST_CLOSE if close else h11.DONE)


# -- a served lane ---------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["process", "thread"])
def vlserve_config(request: pytest.FixtureRequest) -> ServerConfig:
    """Every served-lane test runs with the lane in a process of its own (the default) and
    in a thread of the server process."""
    return ServerConfig(host="127.0.0.1", port=0, drain_timeout=5.0, probe_lane_process=request.param)


@asynccontextmanager
async def lane_server(
    config: ServerConfig, factory: FakeRuntimeFactory
) -> AsyncIterator[tuple[RunningServer, ProbePassLog]]:
    """``run_server`` with a pass log (lane probes: 0 passes, the loop's: 1 or more)."""
    counter = PassCounter()
    trio.lowlevel.add_instrument(counter)
    pass_log = ProbePassLog(counter)
    try:
        async with trio.open_nursery() as nursery:
            start = partial(run_server, config, runtime_factory=factory, pass_log=pass_log)
            server: RunningServer = await nursery.start(start)
            with trio.fail_after(30):
                await server.wait_ready()
            yield server, pass_log
            server.shutdown()
            with trio.fail_after(30):
                await server.wait_stopped()
    finally:
        trio.lowlevel.remove_instrument(counter)


def _answered(pass_log: ProbePassLog) -> dict[str, int]:
    """Probes answered so far: by the lane ('lane', 0 passes) and by the loop ('loop')."""
    counts = {"lane": 0, "loop": 0}
    for histogram in pass_log.histograms():
        for passes, probes in histogram.items():
            counts["lane" if passes == 0 else "loop"] += probes
    return counts


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 0


def _content_length(head: bytes) -> int:
    return next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))


def _blocking_probe(sock: socket.socket, path: str = "/health") -> int:
    """Send ``GET path`` on a blocking socket and read one reply; its status."""
    sock.sendall(request_bytes("GET", path))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before a reply"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = _content_length(head)
    while len(body) < length:
        body += sock.recv(65536)
    return status_of(head)


async def _read_responses(stream: trio.SocketStream, count: int) -> list[bytes]:
    """``count`` pipelined responses with ``Content-Length`` bodies, each head + body."""
    buffer, responses = b"", []
    with trio.fail_after(5):
        while len(responses) < count:
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                end = head_end + 4 + _content_length(buffer[:head_end])
                if len(buffer) >= end:
                    responses.append(buffer[:end])
                    buffer = buffer[end:]
                    continue
            chunk = await stream.receive_some()
            assert chunk, f"EOF after {len(responses)} responses"
            buffer += chunk
    return responses


def _block_loop_until(done: threading.Event) -> None:
    """Block the event loop's thread (no task runs meanwhile) until ``done`` is set."""
    assert done.wait(BLOCKED_LOOP_BOUND_S), "not answered while the loop was blocked"


async def test_probes_are_answered_while_the_event_loop_is_blocked(vlserve_config, fake_factory):
    """Invariant: a probe needs no turn of the event loop. With the loop's thread blocked,
    a keep-alive connection's next probe and a probe on a fresh connection are answered
    (200), and both are the lane's (0 passes)."""
    async with lane_server(vlserve_config, fake_factory) as (server, pass_log):
        address = _address(server.url)
        keep_alive = socket.create_connection(address, timeout=BLOCKED_LOOP_BOUND_S)
        try:
            assert _blocking_probe(keep_alive) == 200  # its first probe, while the loop runs
            statuses: list[int] = []
            done = threading.Event()

            def probe_twice() -> None:
                try:
                    statuses.append(_blocking_probe(keep_alive))
                    with socket.create_connection(address, timeout=BLOCKED_LOOP_BOUND_S) as fresh:
                        statuses.append(_blocking_probe(fresh, "/ready"))
                finally:
                    done.set()

            threading.Thread(target=probe_twice, daemon=True).start()
            _block_loop_until(done)
            assert statuses == [200, 200]
        finally:
            keep_alive.close()
        assert _answered(pass_log) == {"lane": 3, "loop": 0}


async def test_health_turns_503_while_the_loop_is_stuck_and_200_after(vlserve_config, fake_factory):
    """Invariant: ``/health`` answered off the loop still reports a stuck loop. Blocked
    past ``health_loop_stall``, the lane answers 503; once the loop turns again, 200."""
    config = replace(vlserve_config, health_loop_stall=0.2)
    async with lane_server(config, fake_factory) as (server, _):
        address = _address(server.url)
        stream = await connect(server.url)
        async with stream:  # the lane serves (a lane process has started) before the loop blocks
            await stream.send_all(request_bytes("GET", "/health"))
            assert status_of(await read_one_response(stream, timeout=10)) == 200
        statuses: list[int] = []
        done = threading.Event()

        def probe_until_unhealthy() -> None:
            try:
                for _ in range(int(BLOCKED_LOOP_BOUND_S / 0.05)):
                    with socket.create_connection(address, timeout=BLOCKED_LOOP_BOUND_S) as fresh:
                        statuses.append(_blocking_probe(fresh))
                    if statuses[-1] == 503:
                        return
                    threading.Event().wait(0.05)
            finally:
                done.set()

        threading.Thread(target=probe_until_unhealthy, daemon=True).start()
        _block_loop_until(done)
        assert statuses[-1] == 503
        assert statuses[0] == 200  # the first probe came before the stall limit passed
        with trio.fail_after(5):
            while True:  # the loop turns: the monitor wakes, /health recovers
                await trio.sleep(0.02)
                stream = await connect(server.url)
                async with stream:
                    await stream.send_all(request_bytes("GET", "/health"))
                    if status_of(await read_one_response(stream, timeout=5)) == 200:
                        break


async def test_other_requests_go_to_the_loop_with_the_bytes_already_read(vlserve_config, fake_factory):
    """A keep-alive connection that sent probes, then an API request in pieces, then a
    pipelined probe + API request + probe in one write: every reply arrives, in order; the
    probes before the hand-over are the lane's, those after it the loop's."""
    async with lane_server(vlserve_config, fake_factory) as (server, pass_log):
        stream = await connect(server.url)
        async with stream:
            for _ in range(2):
                await stream.send_all(request_bytes("GET", "/health"))
                assert status_of(await read_one_response(stream, timeout=5)) == 200
            assert _answered(pass_log) == {"lane": 2, "loop": 0}
            models = request_bytes("GET", "/v1/models")
            for piece in (models[:1], models[1:9], models[9:]):  # "G", then the rest
                await stream.send_all(piece)
                await trio.sleep(0.01)
            response = await read_one_response(stream, timeout=5)
            assert status_of(response) == 200 and b'"object":"list"' in response.replace(b" ", b"")
            await stream.send_all(
                request_bytes("GET", "/ready") + request_bytes("GET", "/v1/models") + request_bytes("GET", "/health")
            )
            replies = await _read_responses(stream, 3)
        assert [status_of(reply) for reply in replies] == [200, 200, 200]
        assert b"list" in replies[1]
        assert _answered(pass_log) == {"lane": 2, "loop": 2}


async def test_a_probe_the_lane_does_not_read_is_answered_by_the_loop(vlserve_config, fake_factory):
    """``GET /health?verbose`` (a query) and a probe with a body are handed over, and the
    loop answers them as probes; a plain probe on a fresh connection stays the lane's."""
    async with lane_server(vlserve_config, fake_factory) as (server, pass_log):
        for request in (
            request_bytes("GET", "/health?verbose"),
            request_bytes("GET", "/ready", body=b"{}"),
            request_bytes("GET", "/health"),
        ):
            stream = await connect(server.url)
            async with stream:
                await stream.send_all(request)
                assert status_of(await read_one_response(stream, timeout=5)) == 200
        assert _answered(pass_log) == {"lane": 1, "loop": 2}


async def test_replies_match_the_loops_own(vlserve_config, fake_factory):
    """The lane's replies (GET and HEAD, CORS and request-id headers) are the loop's, but
    for the date: same status, headers and body with the lane on and off."""
    config = replace(vlserve_config, cors_allow_origins=("https://a.example",))
    headers = {"Origin": "https://a.example", "X-Request-Id": "probe-1"}
    replies = {}
    for probe_lane in (True, False):
        async with lane_server(replace(config, probe_lane=probe_lane), fake_factory) as (server, pass_log):
            stream = await connect(server.url)
            async with stream:
                for method, path in (("GET", "/health"), ("HEAD", "/ready"), ("GET", "/ready")):
                    await stream.send_all(request_bytes(method, path, headers=headers))
                    if method == "HEAD":  # a Content-Length but no body
                        reply = await read_until(stream, b"\r\n\r\n", timeout=5)
                    else:
                        reply = await read_one_response(stream, timeout=5)
                    head, _, body = reply.partition(b"\r\n\r\n")
                    lines = sorted(
                        line.lower() for line in head.split(b"\r\n")[1:] if not line.lower().startswith(b"date:")
                    )
                    replies.setdefault(probe_lane, []).append((head.split(b"\r\n")[0], lines, body))
            assert _answered(pass_log)["lane" if probe_lane else "loop"] == 3
    assert replies[True] == replies[False]


async def test_keep_alive_limits_hold_on_the_lane(vlserve_config, fake_factory):
    """hypercorn's ``keep_alive_max_requests``: the last allowed probe's reply says
    ``Connection: close`` and the lane closes the connection."""
    async with trio.open_nursery() as nursery:
        start = partial(
            run_server, vlserve_config, runtime_factory=fake_factory, hypercorn_options={"keep_alive_max_requests": 2}
        )
        server: RunningServer = await nursery.start(start)
        await server.wait_ready()
        stream = await connect(server.url)
        async with stream:
            await stream.send_all(request_bytes("GET", "/health"))
            first = await read_one_response(stream, timeout=5)
            await stream.send_all(request_bytes("GET", "/health"))
            last, closed = await read_until_eof(stream, timeout=5)
        assert b"connection: close" not in first.lower()
        assert status_of(last) == 200 and b"connection: close" in last.lower() and closed
        server.shutdown()


async def test_cancelling_the_server_closes_the_lanes_sockets(vlserve_config, fake_factory):
    """Invariant: the lane leaves nothing behind. Cancelling the server (its stop-at-once
    path) returns only once the lane's thread has closed the listener (a new connection
    is refused) and the connections it held (a keep-alive prober's sees EOF)."""
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(partial(run_server, vlserve_config, runtime_factory=fake_factory))
        await server.wait_ready()
        held = socket.create_connection(_address(server.url), timeout=5)
        assert _blocking_probe(held) == 200
        nursery.cancel_scope.cancel()
    try:
        held.settimeout(5)
        assert held.recv(1) == b""
    finally:
        held.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(_address(server.url), timeout=5).close()


async def test_a_lane_cancelled_before_its_thread_starts_closes_its_listener():
    """Invariant: the lane owns its sockets on every path: cancelled before its thread ever
    ran, ``run`` still closes the listener it was given."""
    listener = socket.create_server(("127.0.0.1", 0))
    responder = ProbeResponder(partial(facts_of, RuntimeLifecycle(ServerConfig(), factory=None)), CorsPolicy(()))  # type: ignore[arg-type]
    lane = ProbeLane([listener], responder, Config(), hand_over=lambda sock, data: sock.close())
    with trio.CancelScope() as scope:
        scope.cancel()
        await lane.run()
    assert listener.fileno() == -1
