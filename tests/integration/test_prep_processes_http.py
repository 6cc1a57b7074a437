"""A server with ``--prep-processes``, over real HTTP with the official ``openai`` client."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import openai
import pytest
import trio
from PIL import Image

from tests.integration.invariants import wait_until_quiescent
from vl.prep_config import PrepConfig
from vl.prep_processes import ProcessPrep


@pytest.fixture
def vlserve_config(vlserve_config):
    return dataclasses.replace(vlserve_config, prep=PrepConfig(processes=True))


def jpeg_uri(seed: int) -> str:
    pixels = (np.random.RandomState(seed).rand(120, 160, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}],
        }
    ]


async def test_images_and_errors_through_prep_processes(runtime, http, vlserve_base_url):
    """With prep in worker processes, concurrent image chats complete through the openai
    client, an undecodable image gets a 400 naming its field (raised in a prep process),
    and afterwards every gate is full and idle."""
    assert isinstance(runtime.preparer.runner, ProcessPrep)
    client = openai.AsyncOpenAI(base_url=f"{vlserve_base_url}/v1", api_key="unused", max_retries=0)
    replies: list[str] = []

    async def chat(seed: int) -> None:
        reply = await client.chat.completions.create(
            model=runtime.model_name,
            messages=image_messages(jpeg_uri(seed)),
            max_tokens=8,
            extra_body={"ignore_eos": True},  # the tiny random model may sample its end token early
        )
        replies.append(reply.choices[0].finish_reason)

    async with trio.open_nursery() as nursery:
        for seed in range(6):
            nursery.start_soon(chat, seed)
    assert replies == ["length"] * 6

    bad = "data:image/png;base64," + base64.b64encode(b"these bytes are no image").decode()
    response = await http.post(
        "/v1/chat/completions", json={"model": runtime.model_name, "messages": image_messages(bad), "max_tokens": 4}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[0].image_url" and error["type"] == "invalid_request_error"
    assert (await http.get("/health")).status_code == 200
    await wait_until_quiescent(runtime)
    stats = runtime.preparer.statistics()
    assert stats.image_gate.borrowed == 0 and stats.tokenizer_gate.borrowed == 0
    assert stats.image_gate.completed >= 6
