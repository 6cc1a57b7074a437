"""A storm of real requests with random client disconnects leaves the server clean."""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import trio
from PIL import Image

from tests.helpers.image_server import Route, serve_images
from tests.integration.invariants import limiter_state, slots_idle, wait_until_quiescent

STORM_SIZE = 220
IN_FLIGHT = 48


def jpeg(seed: int, size: int) -> bytes:
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size, size, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def request_bodies(base_url: str, model: str) -> list[dict]:
    """Twelve distinct requests: text, data-URI images and http images."""
    bodies = []
    for i in range(4):
        bodies.append([{"role": "user", "content": f"tell me about the number {i} and the red car"}])
    for i in range(4):
        uri = "data:image/jpeg;base64," + base64.b64encode(jpeg(i, 64 + 24 * i)).decode()
        bodies.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uri}},
                        {"type": "text", "text": f"picture {i}"},
                    ],
                }
            ]
        )
    for i in range(4):
        bodies.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"fetched {i}"},
                        {"type": "image_url", "image_url": {"url": f"{base_url}/img{i}.jpg"}},
                    ],
                }
            ]
        )
    return [{"model": model, "messages": m, "max_tokens": 12 + i % 5, "temperature": 0} for i, m in enumerate(bodies)]


async def complete(http, body: dict, stream: bool) -> str:
    if not stream:
        response = await http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]
    text = []
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta:
                    text.append(delta[0]["delta"].get("content") or "")
    return "".join(text)


async def test_random_disconnect_storm_leaves_every_limiter_full_and_engine_empty(http, runtime):
    """Invariant: after 220 concurrent text, data-URI and http-image requests, ~40% of which
    the client abandons at a random moment (during fetch, prep, encode or generation),
    every limiter is back to full with nobody waiting, no worker thread runs, every pixel
    slot is free, the engine holds no sequences, no cache and no unencoded image, and every
    request that was not abandoned returned exactly what the same request returns when
    sent alone."""
    rng = random.Random(20261124)
    routes = {
        f"/img{i}.jpg": Route(body=jpeg(100 + i, 80 + 16 * i), headers=(("Content-Type", "image/jpeg"),), delay=0.03)
        for i in range(4)
    }
    async with serve_images(routes) as image_base:
        bodies = request_bodies(image_base, runtime.model_name)
        alone = [await complete(http, body, stream=False) for body in bodies]
        await wait_until_quiescent(runtime)

        plan = [
            (rng.randrange(len(bodies)), rng.random() < 0.5, rng.random() < 0.4, rng.uniform(0, 0.4))
            for _ in range(STORM_SIZE)
        ]
        outcomes: list[tuple[int, str] | None] = [None] * STORM_SIZE
        gate = trio.CapacityLimiter(IN_FLIGHT)

        async def one(k: int) -> None:
            which, stream, abandon, after = plan[k]
            async with gate:
                if abandon:
                    # a long generation: only an abort can end it before the checks below
                    long_body = {**bodies[which], "max_tokens": 3000, "ignore_eos": True}
                    with trio.move_on_after(after):
                        await complete(http, long_body, stream)
                    return
                outcomes[k] = (which, await complete(http, bodies[which], stream))

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for k in range(STORM_SIZE):
                    nursery.start_soon(one, k)
        await wait_until_quiescent(runtime, timeout=5.0)

    finished = [o for o in outcomes if o is not None]
    assert len(finished) >= STORM_SIZE // 2
    for which, text in finished:
        assert text == alone[which]
    assert all(v == (0, 0) for v in limiter_state(runtime).values())
    assert slots_idle(runtime)
    stats = runtime.engine.statistics()
    assert (stats.running, stats.waiting, stats.cache_tokens, stats.images_pending) == (0, 0, 0, 0)
    health = await http.get("/health")
    assert health.status_code == 200
