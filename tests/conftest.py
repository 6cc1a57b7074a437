"""Shared fixtures: the built-in tiny model, built once per test session."""

from __future__ import annotations

import pytest

from engine.model_loader import load_model
from engine.tiny_model import QWEN2_VL_DEFAULT_IMAGE_LIMITS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded once (float32, CPU). Tests must not mutate it."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def real_size_tiny_model_dir(tmp_path_factory):
    """The tiny model with Qwen2-VL's default image limits (a 1024² image: 1,369 tokens)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-real-size"), QWEN2_VL_DEFAULT_IMAGE_LIMITS)
