"""The preparation stage on the real tiny model: prompts, features, cache, errors."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from engine.sampling_params import SamplingParams
from server.config import ServerConfig
from server.request_body import parse_chat
from server.runtime import open_runtime
from tests.engine.prompts import chat_prompt, noise_image, reference_generate
from tests.helpers.image_server import RequestLog, Route, serve_images
from vl.chat_messages import Chat, ImagePart, Message, TextPart
from vl.errors import InvalidRequest, MediaError
from vl.media_policy import MediaPolicy
from vl.prep_config import PrepConfig
from vl.prep_processes import ProcessPrep


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def image_message(url: str, text: str = "describe the picture") -> Chat:
    return Chat((Message("user", (ImagePart(url), TextPart(text))),))


@pytest.fixture
def config():
    return ServerConfig(media=MediaPolicy(allow_private_media_urls=True))


@pytest.mark.parametrize("prep_processes", [False, True], ids=["prep-threads", "prep-processes"])
async def test_prepared_image_prompt_matches_hf_and_generates_like_generate(tiny_model, prep_processes):
    """The preparer's prompt (token ids and features) equals the one built directly from the
    tokenizer, image processor and vision tower, and the engine's greedy output on it equals
    transformers' ``generate``: with the prep work in threads and in prep processes."""
    image = noise_image(3, 240, 320)
    expected_prompt, extra = chat_prompt(tiny_model, "describe the picture", image)
    config = ServerConfig(media=MediaPolicy(allow_private_media_urls=True), prep=PrepConfig(processes=prep_processes))
    async with open_runtime(config, loaded=tiny_model) as rt:
        assert isinstance(rt.preparer.runner, ProcessPrep) == prep_processes
        prompt = await rt.preparer.prepare_chat(image_message(data_uri(image)))
        assert prompt.token_ids == expected_prompt.token_ids
        assert torch.allclose(prompt.images[0].embeddings, expected_prompt.images[0].embeddings, atol=1e-5)
        ids = []
        async with rt.engine.open_stream(prompt, SamplingParams(max_tokens=16, temperature=0)) as stream:
            async for delta in stream:
                ids += delta.token_ids
    assert ids == reference_generate(tiny_model, expected_prompt, extra, 16)


async def test_http_image_equals_data_uri_and_repeats_hit_the_cache(tiny_model, config):
    image = noise_image(5, 200, 200)
    async with serve_images({"/img.png": Route(body=png_bytes(image))}) as base_url:
        async with open_runtime(config, loaded=tiny_model) as rt:
            from_url = await rt.preparer.prepare_chat(image_message(f"{base_url}/img.png"))
            from_data = await rt.preparer.prepare_chat(image_message(data_uri(image)))
            again = await rt.preparer.prepare_chat(image_message(f"{base_url}/img.png"))
            stats = rt.preparer.statistics()
    assert from_url.token_ids == from_data.token_ids == again.token_ids
    assert torch.allclose(from_url.images[0].embeddings, from_data.images[0].embeddings)
    assert stats.feature_cache.hits == 1
    assert stats.encoder.images_encoded == 2  # the repeat skipped decode, preprocessing and encoding


async def test_several_images_in_one_request_resolve_concurrently(tiny_model, config):
    images = [noise_image(i, 64 + 32 * i, 96) for i in range(3)]
    routes = {f"/{i}.png": Route(body=png_bytes(img), delay=0.2) for i, img in enumerate(images)}
    log = RequestLog()
    async with serve_images(routes, log=log) as base_url:
        async with open_runtime(config, loaded=tiny_model) as rt:
            content = (*(ImagePart(f"{base_url}/{i}.png") for i in range(3)), TextPart("compare"))
            prompt = await rt.preparer.prepare_chat(Chat((Message("user", content),)))
    assert len(prompt.images) == 3
    pad = tiny_model.model.config.image_token_id
    assert prompt.token_ids.count(pad) == sum(f.embeddings.shape[0] for f in prompt.images)
    assert log.max_active == 3  # the three slow fetches were in flight together


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}],
            "messages[0].content[0].image_url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                }
            ],
            "messages[0].content[0].image_url",
        ),
        ([{"role": "user", "content": "<|image_pad|> sneaky"}], "messages"),
    ],
)
async def test_bad_messages_name_the_offending_field(tiny_model, config, messages, param):
    async with open_runtime(config, loaded=tiny_model) as rt:
        with pytest.raises(InvalidRequest) as info:
            await rt.preparer.prepare_chat(parse_chat(messages))
        stats = rt.preparer.statistics()
    assert info.value.param == param
    assert stats.image_gate.borrowed == 0 and stats.tokenizer_gate.borrowed == 0


async def test_too_many_images(tiny_model):
    config = ServerConfig(media=MediaPolicy(max_images_per_request=2))
    url = data_uri(noise_image(1, 32, 32))
    content = (ImagePart(url),) * 3
    async with open_runtime(config, loaded=tiny_model) as rt:
        with pytest.raises(InvalidRequest) as info:
            await rt.preparer.prepare_chat(Chat((Message("user", content),)))
    assert info.value.code == "too_many_images"
    assert info.value.param == "messages[0].content[2].image_url"


async def test_loopback_url_refused_by_default(tiny_model):
    async with serve_images({"/img.png": Route(body=png_bytes(noise_image(1, 32, 32)))}) as base_url:
        async with open_runtime(ServerConfig(), loaded=tiny_model) as rt:
            with pytest.raises(MediaError) as info:
                await rt.preparer.prepare_chat(image_message(f"{base_url}/img.png"))
    assert info.value.param == "messages[0].content[0].image_url"
