"""pytest fixtures for testing against a real vlserve on loopback.

Registered as the ``vlserve`` pytest11 plugin. Two families:

Function-scoped trio fixtures (pytest-trio: ``trio_mode = true`` or ``@pytest.mark.trio``),
one server per test, in the test's own trio run::

    async def test_models(vlserve_client):
        models = await vlserve_client.models.list()

``vlserve_server`` runs the server in the test's trio run on ``127.0.0.1`` with an
ephemeral port, waits until the model is loaded, and shuts down gracefully at teardown.
Override ``vlserve_config`` (a ``ServerConfig``; default: from ``VLSERVE_*`` variables,
bound to loopback port 0), ``vlserve_runtime_factory`` (default: the real model) or
``vlserve_hypercorn_options`` (hypercorn settings) to change what runs.

A session-scoped server, started once in a thread of its own (its own trio run) and
shared by every test of the session, whatever runs the test (trio, asyncio, plain sync)::

    def test_health(vlserve_session_url):
        assert httpx.get(f"{vlserve_session_url}/health").status_code == 200

``vlserve_session_server`` (a ``SessionServer``: ``url``, ``config``) loads the model
once; ``vlserve_session_url`` is its root URL. Override ``vlserve_session_config`` and
``vlserve_session_runtime_factory`` (session-scoped) to change what runs. The server is
drained and stopped when the session ends.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SessionServer:
    """The session's server: its root ``url`` (``http://127.0.0.1:<port>``) and ``config``."""

    url: str
    config: ServerConfig


class ThreadedServer:
    """A vlserve in a thread of its own, in its own ``trio.run``: for callers that are not
    in a trio run, or whose tests each run in a different one. ``start`` returns once the
    model is loaded; ``stop`` drains (as ``RunningServer.shutdown``) and joins."""

    def __init__(
        self,
        config: ServerConfig,
        runtime_factory: RuntimeFactory | None = None,
        hypercorn_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._runtime_factory = runtime_factory
        self._hypercorn_options = hypercorn_options
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlserve-session-server", daemon=True)
        self._server: RunningServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = READY_TIMEOUT_S) -> SessionServer:
        """Start the thread; wait until the server is ready. Raises what stopped it, or
        ``TimeoutError``."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"vlserve was not ready after {timeout} s")
        if self._error is not None or self._server is None:
            raise RuntimeError("vlserve did not start") from self._error
        return SessionServer(self._server.url, self.config)

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Drain and stop the server; wait for its thread (at most ``timeout`` s)."""
        if self._server is not None and self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._server.shutdown, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as error:  # reported by start()
            self._error = error
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            start = partial(
                run_server,
                self.config,
                runtime_factory=self._runtime_factory,
                hypercorn_options=self._hypercorn_options,
            )
            server: RunningServer = await nursery.start(start)
            await server.wait_ready()
            self._server = server
            self._ready.set()
            await server.wait_stopped()


@pytest.fixture(scope="session")
def vlserve_session_config() -> ServerConfig:
    """The session server's configuration: the environment's, bound to 127.0.0.1 port 0."""
    return config_from_env(os.environ, host="127.0.0.1", port=0)


@pytest.fixture(scope="session")
def vlserve_session_runtime_factory() -> RuntimeFactory | None:
    """The session server's runtime factory; ``None`` means the real model."""
    return None


@pytest.fixture(scope="session")
def vlserve_session_server(
    vlserve_session_config: ServerConfig,
    vlserve_session_runtime_factory: RuntimeFactory | None,
) -> Iterator[SessionServer]:
    """One ready server for the whole session, in its own thread; drained at the end."""
    threaded = ThreadedServer(vlserve_session_config, vlserve_session_runtime_factory)
    try:
        yield threaded.start()
    finally:
        threaded.stop()


@pytest.fixture(scope="session")
def vlserve_session_url(vlserve_session_server: SessionServer) -> str:
    """The session server's root URL (the API is under ``/v1``)."""
    return vlserve_session_server.url
