"""Three vlserve replicas on loopback behind a real load balancer (HAProxy from the
distribution's packages, health-checking ``/ready``), under a bounded load of streamed
image chats: a replica that receives SIGTERM loses no request, a replica that is killed
fails only its own in-flight requests, and traffic moves to the others.

Skipped when ``haproxy`` is not installed (``apt-get install haproxy``)."""

from __future__ import annotations

import base64
import csv
import io
import shutil
import signal
import socket
import subprocess
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image

from tests.server.launch import Launched, launched, wait_ready
from tests.server.sse_client import parse_events

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")

START_TIMEOUT_S = 120
REPLICAS = 3
STREAMS = 6  # concurrent streams per phase: two per replica under round robin
LONG_TOKENS = 400  # streams long enough to be in flight when a replica is signalled
SHORT_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = _image_uri()


def _body(max_tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "what is it?"}]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


HAPROXY_CONFIG = """
global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server inter 200ms fall 1 rise 2
    http-response set-header X-Replica %[srv_name]
{servers}
listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


@dataclass
class Balancer:
    url: str
    stats_url: str
    process: trio.Process

    async def states(self) -> dict[str, str]:
        """Replica name -> HAProxy's status (``UP``, ``DOWN``, ``UP 1/2``...)."""
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(self.stats_url + ";csv")).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"].startswith("r")
        }

    async def wait_states(self, wanted: dict[str, str], timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    states = await self.states()
                except httpx.ConnectError:  # haproxy is still starting
                    states = {}
                if all(states.get(name) == status for name, status in wanted.items()):
                    return
                await trio.sleep(0.1)


@asynccontextmanager
async def haproxy(replica_urls: list[str], workdir: Path):
    servers = "\n".join(f"    server r{i} {url.removeprefix('http://')} check" for i, url in enumerate(replica_urls))
    port, stats_port = _free_port(), _free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, stats_port=stats_port, servers=servers))
    process = await trio.lowlevel.open_process(
        ["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield Balancer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}/stats", process)
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@dataclass
class Stream:
    """One streamed chat through the balancer: which replica served it and how it ended."""

    replica: str | None = None
    data: bytes = b""
    error: BaseException | None = None
    started: trio.Event = field(default_factory=trio.Event)
    go_on: trio.Event = field(default_factory=trio.Event)

    def result(self) -> tuple[list[dict], bool]:
        return parse_events(self.data.decode())


async def run_stream(http: httpx.AsyncClient, stream: Stream, max_tokens: int) -> None:
    """Read up to the first generated token, wait for ``go_on``, read to the end; a
    transport error is recorded, not raised."""
    try:
        async with http.stream("POST", "/v1/chat/completions", json=_body(max_tokens)) as response:
            assert response.status_code == 200, await response.aread()
            stream.replica = response.headers["x-replica"]
            chunks = response.aiter_bytes()
            async for chunk in chunks:
                stream.data += chunk
                if b'"content"' in stream.data:
                    break
            stream.started.set()
            await stream.go_on.wait()
            async for chunk in chunks:
                stream.data += chunk
    except (httpx.RemoteProtocolError, httpx.ReadError) as error:
        stream.error = error
    finally:
        stream.started.set()


async def start_streams(nursery: trio.Nursery, http: httpx.AsyncClient, count: int, max_tokens: int) -> list[Stream]:
    streams = [Stream() for _ in range(count)]
    for stream in streams:
        nursery.start_soon(run_stream, http, stream, max_tokens)
    for stream in streams:
        await stream.started.wait()
    return streams


def assert_whole(stream: Stream, max_tokens: int) -> None:
    assert stream.error is None, (stream.replica, stream.error)
    events, done = stream.result()
    assert done and events[-1]["usage"]["completion_tokens"] == max_tokens, stream.replica


async def test_sigterm_loses_nothing_and_a_killed_replica_fails_only_its_own(tiny_model_dir, tmp_path):
    """Invariants: (1) streams in flight on a replica that gets SIGTERM finish whole, and
    once HAProxy sees its /ready fail no new request goes to it; it exits 0. (2) After a
    SIGKILL, streams on the killed replica end with a transport error (no hang), streams
    on the survivor finish whole, and new requests all succeed on the survivor."""
    args = [
        "-m", "server.cli", "serve", "--port", "0", "--no-engine-process", "--no-prep-processes",
        "--drain-grace", "2", "--drain-timeout", "120", "--no-access-log",
    ]  # fmt: skip
    env = {"VLSERVE_MODEL": str(tiny_model_dir)}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)  # a connection per request
    async with AsyncExitStack() as stack:
        replicas: list[Launched] = [await stack.enter_async_context(launched(args, env)) for _ in range(REPLICAS)]
        urls = []
        for replica in replicas:
            urls.append((await replica.wait_for_line(r"listening on (http://\S+)", START_TIMEOUT_S))[1])
        for url in urls:
            await wait_ready(url, START_TIMEOUT_S)
        balancer = await stack.enter_async_context(haproxy(urls, tmp_path))
        await balancer.wait_states({f"r{i}": "UP" for i in range(REPLICAS)})
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=balancer.url, timeout=120, limits=limits))

        # (1) SIGTERM on a replica that has streams in flight
        async with trio.open_nursery() as nursery:
            streams = await start_streams(nursery, http, STREAMS, LONG_TOKENS)
            served_by = {s.replica for s in streams}
            assert served_by == {"r0", "r1", "r2"}, served_by
            replicas[0].process.send_signal(signal.SIGTERM)
            await balancer.wait_states({"r0": "DOWN"})
            after = await start_streams(nursery, http, STREAMS, SHORT_TOKENS)
            for stream in (*streams, *after):
                stream.go_on.set()
        for stream in streams:
            assert_whole(stream, LONG_TOKENS)
        for stream in after:
            assert_whole(stream, SHORT_TOKENS)
            assert stream.replica in ("r1", "r2")
        with trio.fail_after(60):
            assert await replicas[0].process.wait() == 0, replicas[0].log()

        # (2) SIGKILL on a replica that has streams in flight
        async with trio.open_nursery() as nursery:
            streams = await start_streams(nursery, http, STREAMS, LONG_TOKENS)
            assert {s.replica for s in streams} == {"r1", "r2"}
            replicas[1].process.kill()
            for stream in streams:
                stream.go_on.set()
            nursery.cancel_scope.deadline = trio.current_time() + 60  # the cut streams end, none hangs
        for stream in streams:
            if stream.replica == "r1":
                assert stream.error is not None, "a stream on the killed replica completed"
            else:
                assert_whole(stream, LONG_TOKENS)
        await balancer.wait_states({"r1": "DOWN"})
        async with trio.open_nursery() as nursery:
            after = await start_streams(nursery, http, 4, SHORT_TOKENS)
            for stream in after:
                stream.go_on.set()
        for stream in after:
            assert_whole(stream, SHORT_TOKENS)
            assert stream.replica == "r2"
