"""Run a child process for the duration of a block, and always stop it by its PID.

``managed_process`` starts the command with its output going to a log file, waits until
``ready()`` says so, yields the ``trio.Process``, and on exit sends ``stop_signal``, waits
``stop_timeout`` seconds and then kills the process. Nothing else is signalled: no process
group, no name matching.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio

POLL_INTERVAL = 0.1


class ProcessStartError(RuntimeError):
    """The child exited or did not become ready in time; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@asynccontextmanager
async def managed_process(
    command: list[str],
    *,
    log_path: Path,
    ready: Callable[[], Awaitable[bool]] | None = None,
    startup_timeout: float = 120.0,
    stop_signal: int = signal.SIGINT,
    stop_timeout: float = 15.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[trio.Process]:
    """Start ``command`` (with ``env`` added to this process's environment); yield it once
    ``ready()`` returned True (polled every 0.1 s).

    Raises ``ProcessStartError`` if the process exits first or ``startup_timeout`` passes.
    Cancellation: at any point, the process is stopped (signal, then kill) under a shielded
    scope before ``Cancelled`` propagates, so no child outlives the block.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = await trio.lowlevel.open_process(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **env} if env else None
        )
    try:
        if ready is not None:
            await _wait_ready(process, ready, startup_timeout, log_path)
        yield process
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process, stop_signal, stop_timeout)


async def stop_process(process: trio.Process, stop_signal: int, timeout: float) -> None:
    """Signal ``process`` and wait up to ``timeout`` seconds, then kill it and reap it.

    Cancellation: callers run it in a shielded scope (``managed_process`` does), so the
    process is always reaped.
    """
    if process.returncode is None:
        try:
            process.send_signal(stop_signal)
        except ProcessLookupError:
            pass
        with trio.move_on_after(timeout):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def _wait_ready(
    process: trio.Process, ready: Callable[[], Awaitable[bool]], timeout: float, log_path: Path
) -> None:
    with trio.move_on_after(timeout) as scope:
        while True:
            if process.poll() is not None:
                status = process.returncode
                raise ProcessStartError(f"{process.args!r} exited ({status}) before ready:\n{log_tail(log_path)}")
            if await ready():
                return
            await trio.sleep(POLL_INTERVAL)
    if scope.cancelled_caught:
        raise ProcessStartError(f"{process.args!r} was not ready after {timeout:g} s:\n{log_tail(log_path)}")
