"""Readiness while loading, liveness, graceful drain, and the timeouts Quart must not apply."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import httpx
import pytest
import trio
from hypercorn.trio import serve

from server.app import create_app
from server.config import ServerConfig
from server.hypercorn_config import hypercorn_config
from server.lifecycle import LOAD_PROGRESS_INTERVAL_S, Phase, RuntimeFailed, RuntimeLifecycle
from server.serve import run_server
from tests.server.fakes import FakeRuntime, FakeRuntimeFactory, Script
from tests.server.rawhttp import connect, read_until, request_bytes
from tests.server.sse_client import parse_events

CHAT_STREAM = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200}


def test_quart_timeouts_are_off_and_body_limit_is_ours():
    config = ServerConfig(max_body_bytes=123_456_789)
    app = create_app(config, runtime_factory=FakeRuntimeFactory(FakeRuntime(config)))
    assert app.config["RESPONSE_TIMEOUT"] is None  # Quart's default (60 s) cuts long streams
    assert app.config["BODY_TIMEOUT"] >= 300  # Quart's default is 60 s
    assert app.config["MAX_CONTENT_LENGTH"] == 123_456_789  # Quart's default is 16 MiB


async def test_streaming_response_has_no_timeout(vlserve_server):
    app = vlserve_server.app
    async with app.test_request_context("/v1/chat/completions", method="POST", json=CHAT_STREAM):
        response = await app.full_dispatch_request()
    assert response.timeout is None
    async with response.response as body:  # let the producer run to the end
        chunks = [chunk async for chunk in body]
    assert chunks[-1].endswith(b"data: [DONE]\n\n")


async def test_not_ready_while_loading(vlserve_config):
    factory = FakeRuntimeFactory(FakeRuntime(vlserve_config))
    factory.load_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(run_server, vlserve_config, runtime_factory=factory))
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
            assert ready.json()["phase"] == "loading"
            assert (await http.get("/health")).status_code == 200
            refused = await http.get("/v1/models")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "model_loading"
            factory.load_gate.set()
            with trio.fail_after(5):
                await server.wait_ready()
            assert (await http.get("/ready")).status_code == 200
            assert (await http.get("/v1/models")).status_code == 200
        server.shutdown()
    assert factory.closed == 1
    assert server.state.lifecycle.phase is Phase.STOPPED


async def test_health_is_503_when_the_engine_stalls(http, fake_runtime):
    """The probe lane's process reads the engine's health as published every 10 ms
    (``server.http_path.lane_process``): ``/health`` turns 503 within a few of them."""
    assert (await http.get("/health")).json() == {"status": "ok", "phase": "ready"}
    fake_runtime.engine.healthy = False
    with trio.fail_after(5):
        while (await http.get("/health")).status_code != 503:
            await trio.sleep(0.005)
    assert (await http.get("/ready")).status_code == 200


async def test_failed_runtime_makes_health_503_under_plain_hypercorn(vlserve_config):
    """As with ``hypercorn 'server.app:create_app()'``: the app stays up and says it is dead."""
    factory = FakeRuntimeFactory(FakeRuntime(vlserve_config))
    factory.fail = OSError("no such model")
    app = create_app(vlserve_config, runtime_factory=factory)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        serve_app = partial(serve, app, hypercorn_config(vlserve_config), shutdown_trigger=shutdown.wait)
        (url,) = await nursery.start(serve_app)
        lifecycle = app.extensions["vlserve"].lifecycle
        with pytest.raises(RuntimeFailed):
            await lifecycle.wait_ready()
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["phase"] == "failed"
            chat = await http.post("/v1/chat/completions", json=CHAT_STREAM)
            assert chat.status_code == 503 and "no such model" not in chat.text
        shutdown.set()


async def test_failed_runtime_stops_run_server(vlserve_config):
    factory = FakeRuntimeFactory(FakeRuntime(vlserve_config))
    factory.fail = OSError("no such model")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(run_server, vlserve_config, runtime_factory=factory))
            with pytest.raises(RuntimeFailed):
                await server.wait_ready()
            await server.wait_stopped()
    assert server.state.lifecycle.phase is Phase.FAILED


async def _start_stream(url: str):
    stream = await connect(url)
    body = httpx.Request("POST", "/", json=CHAT_STREAM).read()
    await stream.send_all(request_bytes("POST", "/v1/chat/completions", body=body))
    head = await read_until(stream, b'"content":"t"', timeout=5)
    return stream, head


async def _read_rest(stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


async def test_shutdown_lets_in_flight_streams_finish(vlserve_config):
    runtime = FakeRuntime(vlserve_config)
    runtime.engine.script = Script(pieces=["t"] * 20, delay=0.02)
    factory = FakeRuntimeFactory(runtime)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(run_server, vlserve_config, runtime_factory=factory))
            await server.wait_ready()
            stream, head = await _start_stream(server.url)
            server.shutdown()
            assert server.state.lifecycle.phase is Phase.DRAINING
            async with stream:
                rest = await _read_rest(stream)
    body = (head + rest).split(b"\r\n\r\n", 1)[1]
    assert b"data: [DONE]" in body and body.count(b'"content":"t"') == 20
    assert (runtime.engine.completed, runtime.engine.aborted) == (1, 0)
    assert factory.closed == 1 and server.state.lifecycle.phase is Phase.STOPPED


async def test_drain_timeout_cuts_and_aborts_long_streams(vlserve_config):
    config = dataclasses.replace(vlserve_config, drain_timeout=0.2)
    runtime = FakeRuntime(config)
    runtime.engine.script = Script(pieces=["t"] * 200, delay=0.02)
    factory = FakeRuntimeFactory(runtime)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(run_server, config, runtime_factory=factory))
            await server.wait_ready()
            stream, _ = await _start_stream(server.url)
            started = trio.current_time()
            server.shutdown()
            async with stream:
                rest = await _read_rest(stream)
            await server.wait_stopped()
    assert trio.current_time() - started < 3
    assert b"[DONE]" not in rest
    assert (runtime.engine.completed, runtime.engine.aborted) == (0, 1)
    assert factory.closed == 1


def test_parse_events_rejects_bad_framing():
    with pytest.raises(AssertionError):
        parse_events("data: {}\n")
    assert parse_events('data: {"a":1}\n\ndata: [DONE]\n\n') == ([{"a": 1}], True)


async def test_body_larger_than_quarts_default_limit_is_accepted(http, fake_runtime):
    """A 17 MiB base64 image: over Quart's default MAX_CONTENT_LENGTH (16 MiB), under ours."""
    url = "data:image/png;base64," + "A" * (17 * 1024 * 1024)
    content = [{"type": "image_url", "image_url": {"url": url}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    response = await http.post("/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text[:300]
    received = fake_runtime.preparer.calls[-1].images()[0].image.url
    assert received == url


async def test_unloadable_model_is_one_log_line_without_traceback(caplog):
    """A directory that is not a model fails the runtime with one clear line."""
    import logging

    from server.config import ServerConfig
    from server.lifecycle import Phase, RuntimeLifecycle
    from server.runtime import open_runtime

    lifecycle = RuntimeLifecycle(ServerConfig(model="/nonexistent/model"), open_runtime)
    with caplog.at_level(logging.ERROR, logger="server.lifecycle"):
        await lifecycle.run()
    assert lifecycle.phase is Phase.FAILED
    [record] = [r for r in caplog.records if r.name == "server.lifecycle"]
    assert record.getMessage() == "cannot serve the model: model path '/nonexistent/model' is not a directory"
    assert record.exc_info is None


async def test_a_long_load_logs_its_progress(vlserve_config, caplog, autojump_clock):
    """While loading: a line at the start and one every LOAD_PROGRESS_INTERVAL_S; none
    after the runtime is ready. Driven by trio's autojump clock, no real waiting."""
    caplog.set_level(logging.INFO, logger="server.lifecycle")
    factory = FakeRuntimeFactory(FakeRuntime(vlserve_config))
    factory.load_gate = trio.Event()
    lifecycle = RuntimeLifecycle(vlserve_config, factory)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lifecycle.run)
        await trio.sleep(3.5 * LOAD_PROGRESS_INTERVAL_S)
        factory.load_gate.set()
        await lifecycle.wait_ready()
        await trio.sleep(5 * LOAD_PROGRESS_INTERVAL_S)
        lines = [r.getMessage() for r in caplog.records if r.name == "server.lifecycle"]
        lifecycle.stop()
    assert lines[0].startswith("loading model")
    assert [line for line in lines if line.startswith("still loading")] == [
        f"still loading the model: {n * LOAD_PROGRESS_INTERVAL_S:.0f} s so far" for n in (1, 2, 3)
    ]
