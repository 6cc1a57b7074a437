"""Fixtures for end-to-end tests: the real tiny model behind a real server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from server.config import ServerConfig
from server.pytest_plugin import vlserve_base_url, vlserve_hypercorn_options, vlserve_server  # noqa: F401
from server.runtime import open_runtime
from vl.media_policy import MediaPolicy


@pytest.fixture
def vlserve_config(tiny_model_dir) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1", port=0, model=str(tiny_model_dir), media=MediaPolicy(allow_private_media_urls=True)
    )


@pytest.fixture
def vlserve_runtime_factory(tiny_model):
    return lambda config: open_runtime(config, loaded=tiny_model)


@pytest.fixture
async def runtime(vlserve_server):
    return await vlserve_server.wait_ready()


@pytest.fixture
async def http(vlserve_base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=vlserve_base_url, timeout=60.0, limits=limits) as client:
        yield client
