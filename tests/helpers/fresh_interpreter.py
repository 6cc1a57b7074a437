"""Run a script in a fresh Python interpreter, as a server process or prep process starts:
what it imports there is only what the script's own imports bring."""

from __future__ import annotations

import subprocess
import sys


def run_fresh(script: str, stdin: bytes = b"", timeout: float = 120) -> bytes:
    """``python -c script`` with ``stdin``; its stdout. Fails the test (with the end of
    its stderr) unless it exits 0."""
    run = subprocess.run([sys.executable, "-c", script], input=stdin, capture_output=True, timeout=timeout)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    return run.stdout
