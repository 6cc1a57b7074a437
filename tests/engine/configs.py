"""Engine configs for tests: both placements, with test defaults (one decode step per
call, no stream interval, no added niceness) unless a test asks otherwise."""

from __future__ import annotations

from engine.config import EngineConfig

TEST_DEFAULTS = {"decode_steps_per_call": 1, "stream_interval": 0.0, "nice": 0}


def in_thread(**overrides) -> EngineConfig:
    """The step loop in threads of this process (``--no-engine-process``)."""
    return EngineConfig(**{**TEST_DEFAULTS, "in_worker_process": False, **overrides})


def in_worker(**overrides) -> EngineConfig:
    """The step loop in the engine worker process (the default placement)."""
    return EngineConfig(**{**TEST_DEFAULTS, "in_worker_process": True, **overrides})
