"""``/health`` and ``/ready`` never wait on preparation, the engine or admission."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading

import numpy as np
import pytest
import trio
import trio.testing
from PIL import Image

from engine.config import EngineConfig
from server.config import ServerConfig
from tests.integration.invariants import wait_until_quiescent
from vl.prep_config import PrepConfig


@pytest.fixture
def vlserve_config(vlserve_config: ServerConfig) -> ServerConfig:
    """Prep and the engine in threads of the server process, so that this test can block
    their work there and hold the device gate the engine's steps need."""
    return dataclasses.replace(
        vlserve_config, prep=PrepConfig(processes=False), engine=EngineConfig(in_worker_process=False)
    )


def image_uri(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8")).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def block_in_thread(release: threading.Event, entered: list, fn):
    """Wrap a worker-thread function so it blocks until ``release`` is set."""

    def blocked(*args):
        entered.append(fn.__name__)
        release.wait(30)
        return fn(*args)

    return blocked


async def test_health_answers_while_every_gate_is_saturated(http, runtime):
    """Invariant: with the image-prep gate, the tokenizer gate and the device gate all held
    by blocked work and more requests queued behind each (behind the tokenizer gate in the
    render batcher), ``/health`` and ``/ready`` still
    answer 200; once the work is released every request completes and the gates are full."""
    preparer = runtime.preparer
    release = threading.Event()
    entered: list[str] = []
    tools = preparer.runner.tools  # worker threads (see ``vlserve_config``)
    # what the image-prep step runs (vl.prep_tools.ImagePixels), held blocked in its thread
    tools.pixels_into_slot = block_in_thread(release, entered, tools.pixels_into_slot)
    tools.render_and_tokenize = block_in_thread(release, entered, tools.render_and_tokenize)
    device_holder = object()
    await runtime.device_gate.acquire_on_behalf_of(device_holder)
    statuses = []

    async def chat(i: int) -> None:
        content = [{"type": "text", "text": f"request {i}"}, {"type": "image_url", "image_url": {"url": image_uri(i)}}]
        body = {"model": runtime.model_name, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
        statuses.append((await http.post("/v1/chat/completions", json=body)).status_code)

    try:
        async with trio.open_nursery() as nursery:
            # the first chat's template starts a batch of its own (blocked); the others
            # then queue behind it, in the render batcher, for the tokenizer gate
            nursery.start_soon(chat, 0)
            with trio.fail_after(10):
                while "render_and_tokenize" not in entered:
                    await trio.sleep(0.01)
            for i in range(1, 8):
                nursery.start_soon(chat, i)
            with trio.fail_after(10):
                while True:
                    stats = preparer.statistics()
                    if (
                        stats.image_gate.borrowed == stats.image_gate.total
                        and stats.image_gate.waiting > 0
                        and stats.tokenizer_gate.waiting > 0
                        and set(entered) == {"pixels_into_slot", "render_and_tokenize"}  # both held blocked
                    ):
                        break
                    await trio.sleep(0.01)
            assert runtime.device_gate.borrowed_tokens == 1
            for path in ("/health", "/ready"):
                with trio.fail_after(2):
                    response = await http.get(path)
                assert response.status_code == 200, path
            release.set()
            runtime.device_gate.release_on_behalf_of(device_holder)
    finally:
        release.set()
        if runtime.device_gate.borrowed_tokens and device_holder in runtime.device_gate.statistics().borrowers:
            runtime.device_gate.release_on_behalf_of(device_holder)
    assert statuses == [200] * 8
    await wait_until_quiescent(runtime)
