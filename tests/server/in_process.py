"""A vlserve served in the test's own trio run, on either HTTP path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from server.config import ServerConfig
from server.lifecycle import RuntimeFactory
from server.serve import RunningServer, run_server


@asynccontextmanager
async def serving(
    config: ServerConfig,
    factory: RuntimeFactory,
    *,
    fast_http: bool,
    hypercorn_options: Mapping[str, Any] | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve until the block exits, yielding once the runtime is ready; then shut down
    gracefully and wait until stopped (30 s each, else the test fails)."""
    async with trio.open_nursery() as nursery:
        start = partial(
            run_server, config, runtime_factory=factory, hypercorn_options=hypercorn_options, fast_http=fast_http
        )
        server: RunningServer = await nursery.start(start)
        with trio.fail_after(30):
            await server.wait_ready()
        yield server
        server.shutdown()
        with trio.fail_after(30):
            await server.wait_stopped()
