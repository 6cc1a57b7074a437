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
hypercorn, so each test can fail.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from server.config import ServerConfig
from server.serve import RunningServer, run_server
from tests.server.fakes import FakeRuntimeFactory
from tests.server.pass_probe import fresh_connection_passes, keep_alive_passes

# Passes counted from the client, its own included (see the module docstring).
PROBE_KEEP_ALIVE_MAX = 2  # the server replies in the pass that reads the request
PROBE_FRESH_MAX = 3  # one pass to accept, one to start the connection and reply
APP_REQUEST_KEEP_ALIVE_MAX = (
    4  # through Quart: read + queue, the app's own passes, one write
)

STOCK = pytest.param(
    False,
    id="stock-hypercorn",
    marks=pytest.mark.xfail(strict=True, reason="hypercorn's own passes"),
)
FAST = pytest.param(True, id="http_path")


@pytest.fixture
async def served(
    request, vlserve_config: ServerConfig, fake_factory: FakeRuntimeFactory
):
    async with trio.open_nursery() as nursery:
        start = partial(
            run_server,
            vlserve_config,
            runtime_factory=fake_factory,
            fast_http=request.param,
        )
        server: RunningServer = await nursery.start(start)
        with trio.fail_after(30):
            await server.wait_ready()
        yield server
        server.shutdown()
        with trio.fail_after(30):
            await server.wait_stopped()


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_probe_on_keep_alive_connection_is_answered_in_the_pass_that_reads_it(
    served,
):
    assert await keep_alive_passes(served.url, "/health") <= PROBE_KEEP_ALIVE_MAX


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_probe_on_fresh_connection_needs_an_accept_and_a_start(served):
    assert await fresh_connection_passes(served.url, "/ready") <= PROBE_FRESH_MAX


@pytest.mark.parametrize("served", [STOCK, FAST], indirect=True)
async def test_app_request_on_keep_alive_connection_needs_fewer_passes(served):
    assert (
        await keep_alive_passes(served.url, "/v1/models") <= APP_REQUEST_KEEP_ALIVE_MAX
    )
