"""Run vlserve as a subprocess and read its log: for the launch tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Launched:
    process: trio.Process
    lines: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    async def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first log line matching ``pattern`` (fails after ``timeout``)."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                if self.process.returncode is not None:
                    raise AssertionError("process exited:\n" + "\n".join(self.lines))
                await self._changed.wait()

    def log(self) -> str:
        return "\n".join(self.lines)

    async def _collect(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in complete)
            self._changed.set()
            self._changed = trio.Event()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self._changed.set()


def python_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@asynccontextmanager
async def launched(args: Sequence[str], env: Mapping[str, str]) -> AsyncIterator[Launched]:
    """Start ``python *args`` (stdout and stderr merged into ``lines``); kill it on exit
    if it is still running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, *args],
        cwd=str(REPO),
        env=python_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    result = Launched(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(result._collect, process.stdout)
        try:
            yield result
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def wait_ready(base_url: str, timeout: float) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        with trio.fail_after(timeout):
            while (await http.get("/ready")).status_code != 200:
                await trio.sleep(0.05)
