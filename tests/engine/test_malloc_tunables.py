"""glibc malloc settings (``engine.malloc_tunables``): merged into a child's environment
(the engine worker) or applied with ``mallopt`` in a running process (prep workers), the
environment's own settings kept either way. Each case that changes malloc runs in a child
process, never in the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.malloc_tunables import WORKER_MALLOC_TUNABLES, apply_tunables, merged_tunables

REPO = Path(__file__).resolve().parents[2]
APPLY_THEN_FREE = (
    "import json, sys\n"
    "from tests.helpers.freed_block import apply_then_free\n"
    "print(json.dumps(apply_then_free(sys.argv[1])))\n"
)


def apply_in_child(tunables: str, environment_tunables: str | None) -> tuple[dict[str, int], list[int]]:
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    if environment_tunables is not None:
        env["GLIBC_TUNABLES"] = environment_tunables
    out = subprocess.run(
        [sys.executable, "-c", APPLY_THEN_FREE, tunables], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    applied, freed = json.loads(out.stdout)
    return applied, freed


def test_merged_tunables_keep_the_first_setting_of_each_name():
    assert merged_tunables("", "a=1:b=2") == "a=1:b=2"
    assert merged_tunables("b=9", "a=1:b=2") == "b=9:a=1"
    assert merged_tunables("a=1:", "") == "a=1"
    assert merged_tunables("", "") == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_in_a_running_process_the_defaults_keep_a_freed_25_mib_block_in_the_heap():
    """A prep process applies the settings after it started: each one is set (the 4 GiB
    trim threshold clamped to mallopt's int), and a freed 25 MiB block, which glibc's own
    defaults mmap and give back, now comes from the heap and stays there."""
    applied, freed = apply_in_child(WORKER_MALLOC_TUNABLES, None)
    assert applied == {
        "glibc.malloc.arena_max": 1,
        "glibc.malloc.mmap_threshold": 32 << 20,
        "glibc.malloc.trim_threshold": (1 << 31) - 1,
    }
    assert freed == [0, 0]  # from the heap, and kept there
    applied, freed = apply_in_child("", None)
    assert applied == {} and freed == [25, 0]  # mmapped, and unmapped when freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_setting_the_environment_makes_is_kept():
    """The environment's GLIBC_TUNABLES wins, as ``merged_tunables`` lets it in the engine
    worker: its 1 MiB mmap threshold is not overridden, so the block is mmapped."""
    applied, (mmapped_mib, _) = apply_in_child(WORKER_MALLOC_TUNABLES, "glibc.malloc.mmap_threshold=1048576")
    assert "glibc.malloc.mmap_threshold" not in applied and "glibc.malloc.arena_max" in applied
    assert mmapped_mib == 25


def test_settings_without_a_mallopt_parameter_are_skipped():
    # nothing to apply: the test process's malloc is not touched
    assert apply_tunables("glibc.malloc.hugetlb=1:glibc.cpu.x86_shstk=on:junk", {}) == {}
    assert apply_tunables(WORKER_MALLOC_TUNABLES, {"GLIBC_TUNABLES": WORKER_MALLOC_TUNABLES}) == {}
