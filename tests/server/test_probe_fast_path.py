"""/health and /ready are answered in front of Quart: same answers, same headers, and
no Quart hook, handler or task is involved."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import trio

from server.app import create_app
from tests.server.fakes import FakeRuntimeFactory


async def call_asgi(app, method: str, path: str, headers=()):
    """Drive ``app.asgi_app`` with one request, as hypercorn would; return the messages sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    with trio.fail_after(5):
        await app.asgi_app(scope, receive, send)
    return sent


@pytest.fixture
def app_without_quart(vlserve_config, fake_runtime):
    """An app whose every Quart request hook fails the test if it runs."""
    app = create_app(
        dataclasses.replace(vlserve_config, cors_allow_origins=("https://app.example",)),
        runtime_factory=FakeRuntimeFactory(fake_runtime),
    )

    async def reached_quart():
        raise AssertionError("a probe reached Quart")

    app.before_request_funcs.setdefault(None, []).insert(0, reached_quart)
    return app


async def test_probes_are_answered_without_quart(app_without_quart):
    """Before the runtime starts: /health is 200 (the process is alive), /ready is 503 with
    Retry-After; both carry a fresh X-Request-Id and CORS headers for an allowed origin,
    and Quart's hooks never run."""
    origin = ("Origin", "https://app.example")
    health = await call_asgi(app_without_quart, "GET", "/health", [origin])
    ready = await call_asgi(app_without_quart, "GET", "/ready", [origin, ("X-Request-Id", "probe-1")])
    assert health[0]["status"] == 200
    assert json.loads(health[1]["body"]) == {"status": "ok", "phase": "loading"}
    assert ready[0]["status"] == 503
    assert json.loads(ready[1]["body"])["phase"] == "loading"
    health_headers, ready_headers = dict(health[0]["headers"]), dict(ready[0]["headers"])
    assert re.fullmatch(rb"[0-9a-f]{32}", health_headers[b"x-request-id"])
    assert ready_headers[b"x-request-id"] == b"probe-1"
    assert ready_headers[b"retry-after"] == b"5"
    assert health_headers[b"access-control-allow-origin"] == b"https://app.example"
    assert health_headers[b"content-length"] == str(len(health[1]["body"])).encode()


async def test_head_has_no_body_and_post_is_405(http):
    get = await http.get("/health")
    head = await http.head("/health")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert (await http.post("/health")).status_code == 405


async def test_health_turns_503_when_the_engine_is_unhealthy(http, fake_runtime):
    """Within a few of the probe lane process's 10 ms publishes of the engine's health."""
    assert (await http.get("/health")).status_code == 200
    fake_runtime.engine.healthy = False
    with trio.fail_after(5):
        while (response := await http.get("/health")).status_code != 503:
            await trio.sleep(0.005)
    assert response.json() == {"status": "unavailable", "phase": "ready"}
