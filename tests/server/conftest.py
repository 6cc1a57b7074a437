"""Fixtures for HTTP-layer tests: the vlserve pytest plugin's server, on a fake runtime.

The plugin's fixtures are imported here (rather than relying on the installed ``pytest11``
entry point) so these tests run from a plain checkout; tests that need the real model
override ``vlserve_runtime_factory`` back to ``None``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from server.config import ServerConfig
from server.pytest_plugin import (  # noqa: F401  (fixtures)
    vlserve_base_url,
    vlserve_client,
    vlserve_hypercorn_options,
    vlserve_server,
)
from tests.server.fakes import FakeRuntime, FakeRuntimeFactory


@pytest.fixture
def vlserve_config() -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, drain_timeout=5.0)


@pytest.fixture
def fake_runtime(vlserve_config: ServerConfig) -> FakeRuntime:
    return FakeRuntime(config=vlserve_config)


@pytest.fixture
def fake_factory(fake_runtime: FakeRuntime) -> FakeRuntimeFactory:
    return FakeRuntimeFactory(fake_runtime)


@pytest.fixture
def vlserve_runtime_factory(fake_factory: FakeRuntimeFactory) -> FakeRuntimeFactory:
    return fake_factory


@pytest.fixture
async def http(vlserve_base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for the server (no retries, 10 s timeout)."""
    async with httpx.AsyncClient(base_url=vlserve_base_url, timeout=10.0) as client:
        yield client
