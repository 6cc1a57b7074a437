"""Images through the official client on the real tiny model: ``detail`` and
``mm_processor_kwargs`` set an image's token budget, ``/tokenize`` counts an image's real
tokens (the same preparation as the chat), and images in several turns and roles each get
their own tokens in one real completion."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest

from tests.engine.prompts import noise_image
from tests.server.real_runtime import model_name, vlserve_config, vlserve_runtime_factory  # noqa: F401
from vl.pixel_budget import LOW_DETAIL_TOKENS

TOKEN_PIXELS = 784  # (14 x 2)²: one image token of the tiny model
SERVER_MAX_TOKENS = 200704 // TOKEN_PIXELS  # the tiny model's processor bound: 256 tokens


def data_uri(seed: int, height: int, width: int) -> str:
    buffer = io.BytesIO()
    noise_image(seed, height, width).save(buffer, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


PHOTO = data_uri(1, 450, 600)  # larger than the server's bound (200,704 pixels): capped


def image_part(url: str, detail: str | None = None) -> dict:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": image_url}


def user(*parts) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": "what is it?"}]}


@pytest.fixture
async def http(vlserve_base_url):
    async with httpx.AsyncClient(base_url=vlserve_base_url, timeout=60.0) as client:
        yield client


async def prompt_tokens(client, name, messages, **extra) -> int:
    completion = await client.chat.completions.create(
        model=name, messages=messages, max_tokens=1, extra_body=extra or None
    )
    return completion.usage.prompt_tokens


async def tokenize(http, messages, **extra) -> int:
    return (await http.post("/tokenize", json={"messages": messages, **extra})).json()["count"]


async def test_detail_and_mm_processor_kwargs_set_the_image_budget(vlserve_client, http, model_name):
    """``/tokenize`` runs the chat's preparation, so its count is the chat's prompt tokens
    (checked for two budgets); the budgets: the server's bound by default (a request for
    more is clamped to it), at most 64 tokens with ``detail: low``, less with a smaller
    ``max_pixels``."""
    text = await tokenize(http, [user()])
    full = await tokenize(http, [user(image_part(PHOTO))]) - text
    low = await tokenize(http, [user(image_part(PHOTO, "low"))]) - text
    small = await tokenize(http, [user(image_part(PHOTO))], mm_processor_kwargs={"max_pixels": 40_000}) - text
    beyond = await tokenize(http, [user(image_part(PHOTO, "high"))], mm_processor_kwargs={"max_pixels": 10**9}) - text
    assert LOW_DETAIL_TOKENS < full <= SERVER_MAX_TOKENS + 2 and beyond == full  # +2: vision_start, vision_end
    assert low <= LOW_DETAIL_TOKENS + 2 < full
    assert small <= 40_000 // TOKEN_PIXELS + 2 < full
    assert await prompt_tokens(vlserve_client, model_name, [user(image_part(PHOTO, "low"))]) == text + low
    chat_small = await prompt_tokens(
        vlserve_client, model_name, [user(image_part(PHOTO))], mm_processor_kwargs={"max_pixels": 40_000}
    )
    assert chat_small == text + small
    with pytest.raises(openai.BadRequestError) as raised:
        await prompt_tokens(vlserve_client, model_name, [user(image_part(PHOTO))], mm_processor_kwargs={"size": 3})
    assert raised.value.body["param"] == "mm_processor_kwargs.size"


async def test_images_in_several_turns_and_roles(vlserve_client, http, model_name):
    """User images in turns 1 and 3 and an image in the system message: each expands to its
    own grid's tokens, in order, and a real completion runs on the whole chat."""
    small, wide, tall = data_uri(2, 56, 56), data_uri(3, 112, 224), data_uri(4, 224, 112)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "look:"}, image_part(small)]},
        user(image_part(wide)),
        {"role": "assistant", "content": "a picture"},
        user(image_part(tall), image_part(small, "low")),
    ]
    text = await tokenize(http, [user()])
    singles = [await tokenize(http, [user(image_part(url))]) - text for url in (small, wide, tall)]
    assert singles[0] < singles[1] and singles[1] == singles[2]
    singles.append(singles[0])  # the small one again, at low detail: already under 64 tokens
    counted = (await http.post("/tokenize", json={"messages": messages})).json()
    text_only = [
        {"role": "system", "content": "look:"},
        user(),
        {"role": "assistant", "content": "a picture"},
        user(),
    ]
    assert counted["count"] - await tokenize(http, text_only) == sum(singles)
    completion = await vlserve_client.chat.completions.create(model=model_name, messages=messages, max_tokens=4)
    assert completion.usage.prompt_tokens == counted["count"]
    assert completion.choices[0].finish_reason in ("stop", "length")
