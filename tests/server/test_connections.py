"""Connection handling, on both HTTP paths: ``server.http_path`` (``vlserve serve``) and
hypercorn's own trio path with the shielded-final-send fix (plain ``hypercorn``)."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from server.app import create_app
from server.config import ServerConfig
from server.connection_fix import ShieldedFinalSendConnection
from server.serve import RunningServer, run_server
from tests.server.fakes import FakeRuntime, FakeRuntimeFactory, Script
from tests.server.in_process import serving
from tests.server.rawhttp import (
    connect,
    read_one_response,
    read_until,
    read_until_eof,
    request_bytes,
    status_of,
)

KEEP_ALIVE_S = 0.3
CHAT = b'{"messages": [{"role": "user", "content": "hi"}], "stream": %s, "max_tokens": 200}'


@pytest.fixture(params=[True, False], ids=["http_path", "stock-hypercorn"])
async def vlserve_server(request, vlserve_config: ServerConfig, fake_factory: FakeRuntimeFactory):
    """The plugin's server, on each HTTP path, with a short keep-alive timeout."""
    options = {"keep_alive_timeout": KEEP_ALIVE_S}
    async with serving(vlserve_config, fake_factory, fast_http=request.param, hypercorn_options=options) as server:
        yield server


def test_app_uses_the_fixed_connection_class():
    assert create_app(ServerConfig()).asgi_http_class is ShieldedFinalSendConnection


@pytest.mark.parametrize(
    ("version", "headers"),
    [("1.1", {"Connection": "close"}), ("1.0", {})],
    ids=["connection-close", "http-1.0"],
)
@pytest.mark.parametrize("path", ["/health", "/v1/models", "/nope"])
async def test_connection_that_should_close_gets_eof(vlserve_base_url, version, headers, path):
    stream = await connect(vlserve_base_url)
    async with stream:
        await stream.send_all(request_bytes("GET", path, version=version, headers=headers))
        data, closed = await read_until_eof(stream, timeout=5)
    assert closed, f"no EOF; got {data[:200]!r}"
    assert status_of(data) in (200, 404)


async def test_streamed_response_to_http_1_0_ends_with_eof(vlserve_base_url):
    stream = await connect(vlserve_base_url)
    async with stream:
        request = request_bytes("POST", "/v1/chat/completions", version="1.0", body=CHAT % b"true")
        await stream.send_all(request)
        data, closed = await read_until_eof(stream, timeout=5)
    assert closed
    assert data.rstrip().endswith(b"data: [DONE]")


async def test_idle_keep_alive_connection_is_reaped(vlserve_base_url):
    stream = await connect(vlserve_base_url)
    async with stream:
        for _ in range(2):  # the connection is reused while it is busy...
            await stream.send_all(request_bytes("GET", "/health"))
            assert status_of(await read_one_response(stream, timeout=5)) == 200
        started = trio.current_time()
        data, closed = await read_until_eof(stream, timeout=KEEP_ALIVE_S + 5)
    assert closed and data == b""  # ...and closed once idle past keep_alive_timeout
    assert trio.current_time() - started >= KEEP_ALIVE_S * 0.9


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "non-stream"])
async def test_disconnect_aborts_the_sequence(vlserve_base_url, fake_runtime: FakeRuntime, streaming):
    engine = fake_runtime.engine
    engine.script = Script(pieces=["tok "] * 200, delay=0.01)
    stream = await connect(vlserve_base_url)
    body = CHAT % (b"true" if streaming else b"false")
    await stream.send_all(request_bytes("POST", "/v1/chat/completions", body=body))
    if streaming:
        await read_until(stream, b'"content":"tok "', timeout=5)
    else:
        with trio.fail_after(5):
            while engine.running == 0:
                await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(5):
        await engine.wait_idle()
    assert engine.aborted == 1 and engine.completed == 0
    assert engine.statistics().running == 0


@pytest.mark.parametrize("first", ["/health", "/v1/models"])
async def test_pipelined_requests_are_answered_in_order(vlserve_base_url, first):
    """Two requests in one write (HTTP/1.1 pipelining): two responses, in request order."""
    stream = await connect(vlserve_base_url)
    async with stream:
        await stream.send_all(request_bytes("GET", first) + request_bytes("GET", "/nope"))
        responses = [await read_one_response(stream, timeout=5) for _ in range(2)]
    assert [status_of(r) for r in responses] == [200, 404]


async def test_head_of_a_probe_has_no_body_on_the_wire(vlserve_base_url):
    """HEAD keeps the connection usable: no body bytes follow the head."""
    stream = await connect(vlserve_base_url)
    async with stream:
        await stream.send_all(request_bytes("HEAD", "/health") + request_bytes("GET", "/ready"))
        data = await read_until(stream, b'"phase"', timeout=5)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert status_of(head) == 200 and b"content-length" in head.lower()
    assert rest.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("fast_http", [True, False], ids=["http_path", "stock-hypercorn"])
async def test_shutdown_closes_idle_keep_alive_connections_at_once(fake_factory: FakeRuntimeFactory, fast_http):
    """At shutdown an idle keep-alive connection is closed right away, not kept until its
    keep-alive timeout or the drain deadline (both far longer here than the wait)."""
    config = ServerConfig(host="127.0.0.1", port=0, drain_timeout=600.0)
    async with trio.open_nursery() as nursery:
        start = partial(
            run_server,
            config,
            runtime_factory=fake_factory,
            hypercorn_options={"keep_alive_timeout": 600.0},
            fast_http=fast_http,
        )
        server: RunningServer = await nursery.start(start)
        await server.wait_ready()
        stream = await connect(server.url)
        async with stream:
            await stream.send_all(request_bytes("GET", "/health"))
            assert status_of(await read_one_response(stream, timeout=5)) == 200
            server.shutdown()
            data, closed = await read_until_eof(stream, timeout=10)
        assert closed and data == b""
        with trio.fail_after(10):
            await server.wait_stopped()
