"""pytest fixtures (pytest-trio) for testing against a real vlserve on loopback.

Registered as the ``vlserve`` pytest11 plugin. The fixtures are trio fixtures: use them
from tests run by pytest-trio (``trio_mode = true``, or ``@pytest.mark.trio``)::

    async def test_models(vlserve_client):
        models = await vlserve_client.models.list()

``vlserve_server`` runs the server in the test's trio run on ``127.0.0.1`` with an
ephemeral port, waits until the model is loaded, and shuts down gracefully at teardown.
Override ``vlserve_config`` (a ``ServerConfig``; default: from ``VLSERVE_*`` variables,
bound to loopback port 0), ``vlserve_runtime_factory`` (default: the real model) or
``vlserve_hypercorn_options`` (hypercorn settings) to change what runs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import pytest
import trio

from server.config import ServerConfig
from server.lifecycle import RuntimeFactory
from server.options import config_from_env
from server.serve import RunningServer, run_server

READY_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 60.0


@pytest.fixture
def vlserve_config() -> ServerConfig:
    """The served configuration: the environment's, bound to 127.0.0.1 port 0."""
    return config_from_env(os.environ, host="127.0.0.1", port=0)


@pytest.fixture
def vlserve_runtime_factory() -> RuntimeFactory | None:
    """The runtime factory; ``None`` means the real model (``server.runtime.open_runtime``)."""
    return None


@pytest.fixture
def vlserve_hypercorn_options() -> Mapping[str, Any]:
    """Hypercorn settings to override, e.g. ``{"keep_alive_timeout": 0.5}``."""
    return {}


@pytest.fixture
async def vlserve_server(
    vlserve_config: ServerConfig,
    vlserve_runtime_factory: RuntimeFactory | None,
    vlserve_hypercorn_options: Mapping[str, Any],
) -> AsyncIterator[RunningServer]:
    """A running, ready server; drained and stopped at teardown."""
    async with trio.open_nursery() as nursery:
        start = partial(
            run_server,
            vlserve_config,
            runtime_factory=vlserve_runtime_factory,
            hypercorn_options=vlserve_hypercorn_options,
        )
        server: RunningServer = await nursery.start(start)
        with trio.fail_after(READY_TIMEOUT_S):
            await server.wait_ready()
        yield server
        server.shutdown()
        with trio.fail_after(SHUTDOWN_TIMEOUT_S):
            await server.wait_stopped()


@pytest.fixture
def vlserve_base_url(vlserve_server: RunningServer) -> str:
    """The server's root URL, ``http://127.0.0.1:<port>`` (the API is under ``/v1``)."""
    return vlserve_server.url


@pytest.fixture
async def vlserve_client(vlserve_server: RunningServer, vlserve_config: ServerConfig) -> AsyncIterator[Any]:
    """An ``openai.AsyncOpenAI`` for the server (first configured key; no retries)."""
    import openai

    api_key = vlserve_config.api_keys[0] if vlserve_config.api_keys else "unused"
    client = openai.AsyncOpenAI(base_url=f"{vlserve_server.url}/v1", api_key=api_key, max_retries=0, timeout=60.0)
    try:
        yield client
    finally:
        await client.close()
