"""The Kubernetes drain over real HTTP, against a real ``vlserve serve`` process: on SIGTERM
``/ready`` turns 503 at once while new connections are still accepted and served for
``--drain-grace`` seconds; then the listener closes and in-flight streams finish."""

from __future__ import annotations

import signal
from functools import partial

import httpx
import trio

from server.config import ServerConfig
from server.lifecycle import Phase
from server.serve import run_server
from tests.server.fakes import FakeRuntime, FakeRuntimeFactory
from tests.server.launch import launched, wait_ready
from tests.server.sse_client import parse_events

START_TIMEOUT_S = 120
GRACE_S = 10
STREAM_TOKENS = 300

STREAM_BODY = {
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": STREAM_TOKENS,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


async def _fresh(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a new connection (as a load balancer's health check or a new client)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await http.request(method, path, **kwargs)


class OpenStream:
    """A streamed chat whose reading the test paces: ``first_content`` reads up to the
    first generated token, ``rest`` reads to the end."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_bytes()
        self.data = b""

    async def first_content(self) -> None:
        while b'"content"' not in self.data:
            self.data += await self._chunks.__anext__()

    async def rest(self) -> list[dict]:
        async for chunk in self._chunks:
            self.data += chunk
        events, done = parse_events(self.data.decode())
        assert done
        return events


async def test_sigterm_withdraws_readiness_serves_the_grace_then_drains(tiny_model_dir):
    """Invariant: from the signal on, /ready is 503 while /health is 200 and new connections
    are accepted and served (a chat and a new stream) for the grace; after it, new
    connections are refused; a stream started before the signal and one started during the
    grace both finish whole; the process exits 0."""
    args = [
        "-m", "server.cli", "serve", "--port", "0",
        "--drain-grace", str(GRACE_S), "--drain-timeout", "60",
    ]  # fmt: skip
    async with launched(args, {"VLSERVE_MODEL": str(tiny_model_dir)}) as server:
        url = (await server.wait_for_line(r"listening on (http://\S+)", START_TIMEOUT_S))[1]
        await wait_ready(url, START_TIMEOUT_S)
        async with (
            httpx.AsyncClient(base_url=url, timeout=60) as before_client,
            httpx.AsyncClient(base_url=url, timeout=60) as during_client,
        ):
            async with before_client.stream("POST", "/v1/chat/completions", json=STREAM_BODY) as before:
                before_stream = OpenStream(before)
                await before_stream.first_content()
                server.process.send_signal(signal.SIGTERM)
                await server.wait_for_line("draining", 10)

                ready = await _fresh(url, "GET", "/ready")
                assert ready.status_code == 503 and ready.json()["phase"] == "draining"
                assert (await _fresh(url, "GET", "/health")).status_code == 200
                chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
                response = await _fresh(url, "POST", "/v1/chat/completions", json=chat)
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["message"]["content"]

                async with during_client.stream("POST", "/v1/chat/completions", json=STREAM_BODY) as during:
                    assert during.status_code == 200
                    during_stream = OpenStream(during)
                    await during_stream.first_content()
                    await server.wait_for_line("drain grace over", GRACE_S + 20)
                    try:
                        refused = await _fresh(url, "GET", "/health")
                    except httpx.ConnectError:
                        refused = None
                    assert refused is None, "the listener still accepts after the grace"
                    during_events = await during_stream.rest()
                before_events = await before_stream.rest()
        with trio.fail_after(30):
            returncode = await server.process.wait()
    for events in (before_events, during_events):
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        assert finish[-1] == "length"
        assert events[-1]["usage"]["completion_tokens"] == STREAM_TOKENS
    assert returncode == 0, server.log()


async def test_grace_serves_new_requests_until_a_shutdown_without_grace():
    """In process, no clock involved: ``shutdown(grace)`` withdraws readiness while new
    requests are still served; a later ``shutdown()`` ends the grace at once: new work is
    refused and the listener closes; the server stops."""
    config = ServerConfig(host="127.0.0.1", port=0, drain_timeout=5.0)
    factory = FakeRuntimeFactory(FakeRuntime(config))
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(run_server, config, runtime_factory=factory))
            await server.wait_ready()
            server.shutdown(grace=3600)
            lifecycle = server.state.lifecycle
            assert lifecycle.phase is Phase.DRAINING and lifecycle.takes_new_work
            assert (await _fresh(server.url, "GET", "/ready")).status_code == 503
            assert (await _fresh(server.url, "POST", "/v1/chat/completions", json=chat)).status_code == 200
            server.shutdown()
            assert not lifecycle.takes_new_work
            await server.wait_stopped()
    assert lifecycle.phase is Phase.STOPPED
