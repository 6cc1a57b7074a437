"""Scheduler passes per request on ``server.http_path`` against hypercorn's own trio path.

Counts come from a client in the same trio run that writes its request without yielding
(``tests.server.pass_probe``), less the client's own wake-up on the reply: the passes the
server needs from reading the request (or accepting the connection) to writing the reply.
Measured on hypercorn 0.18.0:

=================  ==========  =====  ================
request            connection  stock  server.http_path
=================  ==========  =====  ================
GET /health        keep-alive      6                 1
GET /health        fresh          11                 1
GET /v1/models     keep-alive      7                 3
GET /v1/models     fresh          12                 3
=================  ==========  =====  ================

The stock path is run under ``xfail(strict=True)``: each bound fails against unpatched
hypercorn, so each test can fail. These are the loop's own passes, so the server runs
without its ``ProbeLane`` (``probe_lane=False``, as for TLS listeners), except in the
pass-log test: the lane answers probes off the loop, in no pass at all
(``tests/server/test_probe_lane.py``).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import trio
import trio.testing

from server.config import ServerConfig
from server.http_path import ProbePassLog
from server.serve import RunningServer, run_server
from tests.server.fakes import FakeRuntimeFactory
from tests.server.in_process import serving
from tests.server.pass_probe import (
    CLIENT_WAKE_UP,
    Client,
    fresh_connection_passes,
    keep_alive_passes,
    pass_counter,
)
from tests.server.rawhttp import read_one_response, request_bytes, status_of

PROBE_KEEP_ALIVE_MAX = 1  # the reply is written in the pass that reads the request
PROBE_FRESH_MAX = 1  # ... and, on a new connection, in the pass that accepts it
APP_REQUEST_MAX = 3  # through Quart: read + queue, then quart-trio's own passes
PROBE_BEHIND_WAVE_MAX = 2  # the accept pass takes the whole queue; the next one reads
WAVE = 40  # connections queued ahead of the probe (the listen backlog holds them)

STOCK = pytest.param(
    False,
    id="stock-hypercorn",
    marks=pytest.mark.xfail(strict=True, reason="hypercorn's own passes"),
)
FAST = pytest.param(True, id="http_path")


@pytest.fixture
async def served(request, vlserve_config: ServerConfig, fake_factory: FakeRuntimeFactory):
    config = replace(vlserve_config, probe_lane=False)
    async with serving(config, fake_factory, fast_http=request.param) as server:
        yield server


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_probe_on_keep_alive_connection_is_answered_in_the_pass_that_reads_it(
    served,
):
    assert await keep_alive_passes(served.url, "/health") <= PROBE_KEEP_ALIVE_MAX


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_probe_on_fresh_connection_is_answered_in_the_pass_that_accepts_it(served):
    assert await fresh_connection_passes(served.url, "/ready") <= PROBE_FRESH_MAX


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_probe_behind_a_wave_of_new_connections_is_answered_in_the_next_pass(served):
    """A probe whose connection waits in the kernel's queue behind ``WAVE`` others (clients
    that connected at once, as a closed-loop burst or a sync client does) is answered at
    most one pass after the pass that accepts it: the whole queue is accepted in one pass.
    trio's own accept loop takes one connection per pass (so the stock path must fail)."""
    await trio.testing.wait_all_tasks_blocked()
    wave = [Client(served.url) for _ in range(WAVE)]
    try:
        async with pass_counter() as counter:
            start = counter.passes
            probe = Client(served.url)
            probe.send_now(request_bytes("GET", "/health"))
            async with probe.stream:
                response = await read_one_response(probe.stream, timeout=10)
                passes = counter.passes - start - CLIENT_WAKE_UP
        assert status_of(response) == 200
        assert passes <= PROBE_BEHIND_WAVE_MAX
    finally:
        for client in wave:
            await client.stream.aclose()


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_app_request_needs_fewer_passes(served):
    assert await keep_alive_passes(served.url, "/v1/models") <= APP_REQUEST_MAX
    assert await fresh_connection_passes(served.url, "/v1/models") <= APP_REQUEST_MAX


@pytest.mark.parametrize(("probe_lane", "passes"), [(False, "1"), (True, "0")], ids=["loop", "lane"])
async def test_probe_pass_log_records_each_probe_by_connection_kind(
    vlserve_config: ServerConfig, fake_factory: FakeRuntimeFactory, probe_lane: bool, passes: str
):
    """The server's own count (what ``vlserve serve`` writes for the benchmark): every
    probe, keep-alive or on a fresh connection, written in the pass that read it (on the
    loop), or answered by the lane's thread in none."""
    vlserve_config = replace(vlserve_config, probe_lane=probe_lane)
    async with pass_counter() as counter:
        pass_log = ProbePassLog(counter)
        async with trio.open_nursery() as nursery:
            start = partial(
                run_server,
                vlserve_config,
                runtime_factory=fake_factory,
                pass_log=pass_log,
            )
            server: RunningServer = await nursery.start(start)
            await server.wait_ready()
            # 4 probes on one connection (its first request counts as fresh), then 3 fresh
            await keep_alive_passes(server.url, "/health", repeats=3)
            await fresh_connection_passes(server.url, "/ready", repeats=3)
            server.shutdown()
    summary = pass_log.summary()
    assert summary["keep_alive"]["histogram"] == {passes: 3}
    assert summary["fresh"]["histogram"] == {passes: 4}
