"""The servers under test and how to start each: vlserve (its defaults: engine and vision
encoder in the engine worker process, prep work in prep processes), vlserve-thread (engine
in a thread of the server process), vlserve-prep-threads (prep work in threads of the
server process) and the two LMDeploy-style baselines.

A vlserve variant can also run from another source tree, to compare two versions of the
code side by side in one run: ``vlserve@LABEL`` is the variant ``vlserve`` started with
``PYTHONPATH`` set to the tree given for ``LABEL`` (``bench.serve --source LABEL=DIR``), so
the server, its engine worker and its prep processes all import that tree's code."""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.launch.process import free_port, managed_process
from bench.launch.readiness import http_ready

SERVERS = ("vlserve", "vlserve-thread", "vlserve-prep-threads", "pr-style", "main-style")
DEFAULT_SERVERS = ("vlserve", "pr-style", "main-style")
VLSERVE_VARIANTS = {
    "vlserve": (),
    "vlserve-thread": ("--no-engine-process",),
    "vlserve-prep-threads": ("--no-prep-processes",),
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def vlserve_variant(name: str) -> str | None:
    """The ``VLSERVE_VARIANTS`` key that server ``name`` runs (``vlserve@LABEL`` runs
    ``vlserve``), or ``None`` for a baseline."""
    base = name.partition("@")[0]
    return base if base in VLSERVE_VARIANTS else None


def source_label(name: str) -> str | None:
    """``LABEL`` of a server named ``VARIANT@LABEL``, else ``None``."""
    return name.partition("@")[2] or None


def known_server(name: str) -> bool:
    """A name ``--servers`` accepts: one of ``SERVERS``, or ``VARIANT@LABEL`` for a vlserve
    variant."""
    return name in SERVERS or (vlserve_variant(name) is not None and source_label(name) is not None)


@dataclass(frozen=True)
class RunningServer:
    name: str
    base_url: str
    pid: int


def vlserve_executable() -> str:
    """The ``vlserve`` script beside this interpreter, else the one on ``PATH``."""
    beside = Path(sys.executable).with_name("vlserve")
    if beside.exists():
        return str(beside)
    found = shutil.which("vlserve")
    if found is None:
        raise FileNotFoundError("no 'vlserve' executable beside the interpreter or on PATH")
    return found


def vlserve_pixel_slot_args(pixel_slot_mb: int | None) -> tuple[str, ...]:
    """vlserve's flags for pixel slots of ``pixel_slot_mb`` MiB, for the real-size image
    setting (``bench.workloads.image_tokens``); none for ``None``, where vlserve sizes its
    slots for its image processor's max_pixels (at Qwen2-VL's default max_pixels that is
    ≈147 MiB a slot, x 16 slots of /dev/shm, for images the benchmark never sends)."""
    return ("--pixel-slot-mb", str(pixel_slot_mb)) if pixel_slot_mb else ()


def server_command(name: str, port: int, model: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line that serves ``name`` on 127.0.0.1:``port``, ``extra`` appended."""
    model_args = ["--model", model, *extra] if model else list(extra)
    variant = vlserve_variant(name)
    if variant is not None:
        return [
            vlserve_executable(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--allow-private-media-urls",
            *VLSERVE_VARIANTS[variant],
            *model_args,
        ]
    if name in ("pr-style", "main-style"):
        return [
            sys.executable,
            "-m",
            "bench.baselines",
            "--layout",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *model_args,
        ]
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


@asynccontextmanager
async def running_server(
    name: str,
    log_dir: Path,
    *,
    model: str | None = None,
    extra_args: tuple[str, ...] = (),
    startup_timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve ``name`` on a free loopback port until the block exits; yield it once ready.
    ``env`` is added to the server's environment. With ``source`` (a vlserve tree), the
    server runs that tree's code: ``PYTHONPATH`` and the working directory are ``source``
    (``python -m`` puts the working directory first, so the engine worker imports it too).

    Stops it with SIGINT, then kills it by PID after 15 s. Cancellation: as
    ``managed_process``: the server is always stopped.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    async with managed_process(
        server_command(name, port, model, extra_args),
        log_path=log_dir / f"{name}-{port}.log",
        ready=http_ready(base_url),
        startup_timeout=startup_timeout,
        cwd=source or REPO_ROOT,
        env=env if source is None else {**(env or {}), "PYTHONPATH": str(source)},
    ) as process:
        yield RunningServer(name=name, base_url=base_url, pid=process.pid)


@asynccontextmanager
async def running_image_server(image_dir: Path, log_dir: Path, *, latency: float) -> AsyncIterator[str]:
    """Serve ``image_dir`` as ``/<index>.jpg`` with ``latency`` seconds per image; yield its URL.

    Cancellation: as ``managed_process``: the image server is always stopped.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "bench.workloads.image_server",
        "--dir",
        str(image_dir),
        "--port",
        str(port),
        "--latency",
        str(latency),
    ]
    async with managed_process(
        command,
        log_path=log_dir / f"image-server-{port}.log",
        ready=http_ready(base_url, paths=("/ping",)),
        startup_timeout=30.0,
        cwd=REPO_ROOT,
    ):
        yield base_url
