"""Which code and machine a result came from: git commit, uncommitted changes, CPU count."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def _git(repo: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(repo: Path) -> dict:
    """The commit, the files changed but not committed under the served packages (a result
    measured on a dirty tree says so), and the machine's basics. Blocking (runs git)."""
    dirty = _git(repo, "status", "--porcelain", "--", "server", "engine", "vl", "bench")
    return {
        "commit": _git(repo, "rev-parse", "--short", "HEAD"),
        "uncommitted": [line[3:] for line in dirty.splitlines()],
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
