"""The preparation stage on the real tiny model: prompts, features, cache, errors."""

from __future__ import annotations

import base64
import io

import pytest
import torch
import trio

from engine.patch_embed import repeat_frame
from engine.sampling_params import SamplingParams
from server.config import ServerConfig
from server.request_body import parse_chat
from server.runtime import open_runtime
from tests.engine.prompts import chat_prompt, noise_image, reference_generate
from tests.engine.streams import wait_until_idle
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


async def generate(rt, prepared, max_tokens: int = 16) -> list[int]:
    """Greedy tokens of a prepared prompt; drops the caller's hold on its lease."""
    ids = []
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        async with rt.engine.open_stream(prepared.prompt, params, prepared.lease) as stream:
            async for delta in stream:
                ids += delta.token_ids
    finally:
        if prepared.lease is not None:
            prepared.lease.release_creator()
    return ids


def all_slots_free(rt) -> bool:
    stats = rt.slots.statistics()
    return stats.free == stats.total and stats.waiting == 0


@pytest.mark.parametrize("prep_processes", [False, True], ids=["prep-threads", "prep-processes"])
async def test_prepared_image_prompt_matches_hf_and_generates_like_generate(tiny_model, prep_processes):
    """The preparer's prompt (token ids, and the pixels it put in the image's slot) equals
    the one built directly from the tokenizer and image processor, and the engine's greedy
    output on it (encoded by the engine's own vision encoder) equals transformers'
    ``generate``: with the prep work in threads and in prep processes. Every slot is free
    once the request is done."""
    image = noise_image(3, 240, 320)
    expected_prompt, extra = chat_prompt(tiny_model, "describe the picture", image)
    config = ServerConfig(media=MediaPolicy(allow_private_media_urls=True), prep=PrepConfig(processes=prep_processes))
    async with open_runtime(config, loaded=tiny_model) as rt:
        assert isinstance(rt.preparer.runner, ProcessPrep) == prep_processes
        prepared = await rt.preparer.prepare_chat(image_message(data_uri(image)))
        prompt = prepared.prompt
        assert prompt.token_ids == expected_prompt.token_ids
        [image_input] = prompt.images
        assert image_input.grid_thw == expected_prompt.images[0].grid_thw
        # the slot holds each patch's frame once (vl/qwen2_vl_pixels.py); repeated, the processor's rows
        stored = rt.slots.memory.read(image_input.pixels)
        assert torch.equal(repeat_frame(stored, in_channels=3, temporal=2), extra["pixel_values"])
        ids = await generate(rt, prepared)
        await wait_until_idle(rt.engine)
        assert all_slots_free(rt)
    assert ids == reference_generate(tiny_model, expected_prompt, extra, 16)


async def test_http_image_equals_data_uri_and_the_engine_encodes_a_repeat_once(tiny_model, config):
    """An image by URL and the same bytes as a data URI prepare to the same prompt and
    pixels; the engine's feature cache serves the repeat of a URL without encoding it."""
    image = noise_image(5, 200, 200)
    async with serve_images({"/img.png": Route(body=png_bytes(image))}) as base_url:
        async with open_runtime(config, loaded=tiny_model) as rt:
            from_url = await rt.preparer.prepare_chat(image_message(f"{base_url}/img.png"))
            from_data = await rt.preparer.prepare_chat(image_message(data_uri(image)))
            assert from_url.prompt.token_ids == from_data.prompt.token_ids
            assert torch.equal(
                rt.slots.memory.read(from_url.prompt.images[0].pixels),
                rt.slots.memory.read(from_data.prompt.images[0].pixels),
            )
            outputs = [await generate(rt, from_url), await generate(rt, from_data)]
            again = await rt.preparer.prepare_chat(image_message(f"{base_url}/img.png"))
            assert again.prompt.images[0].key == from_url.prompt.images[0].key
            outputs.append(await generate(rt, again))
            await wait_until_idle(rt.engine)
            stats = rt.engine.statistics()
            assert all_slots_free(rt)
    assert outputs[0] == outputs[1] == outputs[2]
    distinct = len({from_url.prompt.images[0].key, from_data.prompt.images[0].key})
    assert stats.images_encoded == distinct and stats.image_cache_hits >= 1


async def test_several_images_in_one_request_resolve_concurrently(tiny_model, config):
    images = [noise_image(i, 64 + 32 * i, 96) for i in range(3)]
    routes = {f"/{i}.png": Route(body=png_bytes(img), delay=0.2) for i, img in enumerate(images)}
    log = RequestLog()
    async with serve_images(routes, log=log) as base_url:
        async with open_runtime(config, loaded=tiny_model) as rt:
            content = (*(ImagePart(f"{base_url}/{i}.png") for i in range(3)), TextPart("compare"))
            prepared = await rt.preparer.prepare_chat(Chat((Message("user", content),)))
            assert len(prepared.lease) == 3 and rt.slots.statistics().free == rt.slots.statistics().total - 3
            prepared.lease.release_creator()
            assert all_slots_free(rt)
    prompt = prepared.prompt
    assert len(prompt.images) == 3
    pad = tiny_model.model.config.image_token_id
    merge = tiny_model.adapter.spatial_merge_size
    assert prompt.token_ids.count(pad) == sum(i.num_patches // merge**2 for i in prompt.images)
    assert log.max_active == 3  # the three slow fetches were in flight together


async def test_requests_with_several_images_never_wait_for_each_other_s_slots(tiny_model):
    """Invariant: a request takes its images' slots all at once, so requests with several
    images cannot each hold some slots and wait forever for the rest. Two 2-image chats on
    a pool of 2 slots, each with one fast and one slow image: taken image by image, each
    chat's fast image would hold one slot and both would wait for a second one forever;
    both are prepared."""
    config = ServerConfig(
        media=MediaPolicy(allow_private_media_urls=True, max_images_per_request=2),
        prep=PrepConfig(pixel_slots=2, processes=False),
    )
    routes = {}
    for chat in "ab":
        routes[f"/{chat}-fast.png"] = Route(body=png_bytes(noise_image(1, 64, 64)))
        routes[f"/{chat}-slow.png"] = Route(body=png_bytes(noise_image(2, 64, 64)), delay=0.5)
    prepared: list[str] = []
    async with serve_images(routes) as base_url, open_runtime(config, loaded=tiny_model) as rt:

        async def request(chat: str) -> None:
            content = (ImagePart(f"{base_url}/{chat}-fast.png"), ImagePart(f"{base_url}/{chat}-slow.png"))
            result = await rt.preparer.prepare_chat(Chat((Message("user", (*content, TextPart("compare"))),)))
            prepared.append(chat)
            result.lease.release_creator()  # as a request that has submitted its sequence

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request, "a")
                nursery.start_soon(request, "b")
        assert sorted(prepared) == ["a", "b"] and all_slots_free(rt)


def test_a_request_may_not_carry_more_images_than_there_are_slots():
    with pytest.raises(ValueError, match="--max-images-per-request \\(9\\) must not exceed --pixel-slots \\(8\\)"):
        ServerConfig(media=MediaPolicy(max_images_per_request=9), prep=PrepConfig(pixel_slots=8))


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
        assert all_slots_free(rt)
        assert rt.preparer.statistics().image_gate.borrowed == 0
        # the chat's template may still be rendering in a batch the render batcher owns:
        # its token comes back when that call ends, not with the request
        with trio.fail_after(30):
            while rt.preparer.statistics().tokenizer_gate.borrowed:
                await trio.sleep(0.01)
    assert info.value.param == param


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
