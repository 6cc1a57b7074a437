"""``server.http_path.serve`` on its own, with a bare ASGI app: probes are answered inside
the HTTP/1.1 protocol (the app never sees them), everything else reaches the app."""

from __future__ import annotations

import json
from functools import partial

import pytest
import trio
from hypercorn.config import Config

from server.config import ServerConfig
from server.cors import CorsPolicy
from server.http_path import serve
from server.lifecycle import RuntimeLifecycle
from server.probes import ProbeResponder, facts_of
from tests.server.rawhttp import (
    connect,
    read_one_response,
    read_until,
    request_bytes,
    status_of,
)


class RecordingApp:
    """An ASGI app answering 200 ``app`` to every HTTP request; records the paths it saw."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.paths.append(scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"3")],
            }
        )
        await send({"type": "http.response.body", "body": b"app"})


@pytest.fixture
async def served():
    app = RecordingApp()
    lifecycle = RuntimeLifecycle(ServerConfig(), factory=None)  # type: ignore[arg-type]  # never run: loading
    responder = ProbeResponder(partial(facts_of, lifecycle), CorsPolicy(["https://app.example"]))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve, app, config, probes=responder, shutdown_trigger=shutdown.wait))
        yield app, urls[0]
        shutdown.set()


def _split(data: bytes, has_body: list[bool]) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Pipelined responses as (status, headers, body); ``has_body`` false for a HEAD reply."""
    out = []
    for body_expected in has_body:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
        length = int(headers[b"content-length"]) if body_expected else 0
        out.append((status_of(lines[0]), headers, data[:length]))
        data = data[length:]
    assert data == b""
    return out


async def test_probes_never_reach_the_app_and_carry_the_usual_headers(served):
    app, url = served
    stream = await connect(url)
    async with stream:
        health = request_bytes(
            "GET",
            "/health",
            headers={"Origin": "https://app.example", "X-Request-Id": "p-1"},
        )
        await stream.send_all(health + request_bytes("HEAD", "/ready") + request_bytes("GET", "/v1/other"))
        data = await read_until(stream, b"\r\n\r\napp", timeout=5)
    (
        (status, headers, body),
        (ready_status, ready_headers, _),
        (other_status, _, other_body),
    ) = _split(data, [True, False, True])
    assert status == 200 and json.loads(body) == {"status": "ok", "phase": "loading"}
    assert headers[b"x-request-id"] == b"p-1"
    assert headers[b"access-control-allow-origin"] == b"https://app.example"
    assert b"date" in headers  # hypercorn's own response headers are kept
    assert ready_status == 503 and ready_headers[b"retry-after"] == b"5"
    assert other_status == 200 and other_body == b"app"
    assert app.paths == ["/v1/other"]


async def test_other_methods_on_probe_paths_reach_the_app(served):
    app, url = served
    stream = await connect(url)
    async with stream:
        await stream.send_all(request_bytes("POST", "/health", body=b"{}"))
        assert status_of(await read_one_response(stream, timeout=5)) == 200
    assert app.paths == ["/health"]
