"""Fixtures for a test module that serves the real tiny model through the plugin's server
(``tests/server/conftest.py`` serves a fake runtime): import them into the module."""

from __future__ import annotations

import dataclasses

import pytest

from server.runtime import open_runtime


@pytest.fixture
def vlserve_config(vlserve_config, tiny_model_dir):
    return dataclasses.replace(vlserve_config, model=str(tiny_model_dir))


@pytest.fixture
def vlserve_runtime_factory(tiny_model):
    """The real runtime around the session's already-loaded tiny model."""
    return lambda config: open_runtime(config, loaded=tiny_model)


@pytest.fixture
def model_name(vlserve_config) -> str:
    return vlserve_config.model_name
