"""Layers import downwards only (server -> vl -> engine), and light modules stay light.

Run in fresh interpreters, so what other tests imported does not hide an import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT_MODULES = [
    "engine.wire",
    "engine.scheduler",
    "engine.block_manager",
    "engine.request_stream",
    "engine.config",
    "engine.errors",
    "engine.core_messages",
    "engine.stream_registry",
    "engine.interface",
    "engine.outbox",
    "engine.statistics",
    "engine.async_engine",
    "engine.step_loop",
    "engine.sampling_params",
    "engine.prompt",
    "engine.pixel_slots",
    "engine.slot_lease",
]
HEAVY = ("torch", "transformers")


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_do_not_import_torch_or_transformers(module):
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"
