"""Connection handling under hypercorn's trio worker with the shielded-final-send fix."""

from __future__ import annotations

import pytest
import trio

from server.app import create_app
from server.config import ServerConfig
from server.connection_fix import ShieldedFinalSendConnection
from tests.server.fakes import FakeRuntime, Script
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


@pytest.fixture
def vlserve_hypercorn_options():
    return {"keep_alive_timeout": KEEP_ALIVE_S}


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
async def test_disconnect_aborts_the_sequence(
    vlserve_base_url, fake_runtime: FakeRuntime, streaming
):
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
