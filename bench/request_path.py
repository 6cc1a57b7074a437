"""Which of vlserve's own modules one image chat runs through, per process.

    python -m bench.request_path [--no-engine-process] [--stream]

Serves the built-in tiny model on a loopback port, warms it up with one image chat, then
sends one more (a data-URI JPEG, streamed or not) while a profiler records every function
of ``server/``, ``vl/`` and ``engine/`` that runs in the server process (event loop and
worker threads). With ``--no-engine-process`` the step loop runs in a thread of the same
process, so the engine's modules are recorded too (the worker process runs the same step
loop code, with ``engine.worker_main`` in place of ``engine.thread_core``). Prints the
modules: the list ``docs/architecture.md`` walks through.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import sys
import threading
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "vl", "engine")


class ModuleRecorder:
    """A ``sys.setprofile`` hook that records the project modules whose code runs."""

    def __init__(self) -> None:
        self.modules: set[str] = set()
        self.active = False

    def __call__(self, frame, event, arg) -> None:
        if not self.active or event != "call":
            return
        module = module_of(frame.f_code.co_filename)
        if module is not None:
            self.modules.add(module)


def module_of(filename: str) -> str | None:
    """``server.sse`` for ``<repo>/server/sse.py``; ``None`` outside the three packages."""
    try:
        relative = Path(filename).resolve().relative_to(REPO)
    except ValueError:
        return None
    if relative.parts[0] not in PACKAGES or relative.suffix != ".py":
        return None
    return ".".join(relative.with_suffix("").parts).removesuffix(".__init__")


def image_chat(stream: bool, shade: int) -> dict:
    """A chat with one 640x480 JPEG of colour ``shade`` (a new shade misses the feature cache)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (shade, 140, 200)).save(buffer, format="JPEG")
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {
        "model": "vlserve-tiny-qwen2-vl",
        "max_tokens": 8,
        "stream": stream,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is it?"}],
            }
        ],
    }


async def trace(engine_process: bool, stream: bool) -> set[str]:
    from server.config import ServerConfig
    from server.serve import run_server

    recorder = ModuleRecorder()
    sys.setprofile(recorder)
    threading.setprofile(recorder)
    config = ServerConfig(port=0)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, in_worker_process=engine_process))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_server, config)
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            (await http.post("/v1/chat/completions", json=image_chat(stream, 1))).raise_for_status()
            recorder.active = True
            (await http.post("/v1/chat/completions", json=image_chat(stream, 2))).raise_for_status()
            recorder.active = False
        server.shutdown()
    sys.setprofile(None)
    threading.setprofile(None)
    return recorder.modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-engine-process", action="store_true")
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    modules = trio.run(trace, not args.no_engine_process, args.stream)
    for package in PACKAGES:
        names = sorted(m for m in modules if m.split(".")[0] == package)
        print(f"{package}/ ({len(names)}): {', '.join(names)}")
    print(f"modules in all: {len(modules)}")


if __name__ == "__main__":
    main()
