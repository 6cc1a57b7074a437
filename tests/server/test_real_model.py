"""The real tiny model behind a real server on loopback, judged by the official client."""

from __future__ import annotations

import base64
import dataclasses
import io
from functools import partial

import httpx
import openai
import pytest
import trio
from PIL import Image

from tests.helpers.image_server import Route, serve_images
from tests.server.real_runtime import model_name, vlserve_runtime_factory  # noqa: F401
from vl.media_policy import MediaPolicy

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def vlserve_config(vlserve_config, tiny_model_dir):
    return dataclasses.replace(
        vlserve_config, model=str(tiny_model_dir), media=MediaPolicy(allow_private_media_urls=True)
    )


def png_bytes(size=(56, 56)) -> bytes:
    image = Image.new("RGB", size)
    image.putdata([(x * 4 % 256, y * 4 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


async def test_models_list(vlserve_client, model_name):
    models = await vlserve_client.models.list()
    assert [m.id for m in models.data] == [model_name]


async def test_chat_text(vlserve_client, model_name):
    completion = await vlserve_client.chat.completions.create(
        model=model_name, messages=USER, max_tokens=8, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 8 and completion.usage.prompt_tokens > 0
    again = await vlserve_client.chat.completions.create(model=model_name, messages=USER, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


async def test_chat_with_data_uri_image(vlserve_client, model_name):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    text_only = await vlserve_client.chat.completions.create(model=model_name, messages=USER, max_tokens=4)
    completion = await vlserve_client.chat.completions.create(
        model=model_name, messages=image_message(url), max_tokens=4, temperature=0
    )
    assert completion.usage.prompt_tokens > text_only.usage.prompt_tokens
    assert completion.choices[0].finish_reason in ("stop", "length")


async def test_chat_with_http_image(vlserve_client, model_name):
    async with serve_images({"/cat.png": Route(body=png_bytes(), headers=(("Content-Type", "image/png"),))}) as base:
        completion = await vlserve_client.chat.completions.create(
            model=model_name, messages=image_message(f"{base}/cat.png"), max_tokens=4
        )
        assert completion.usage.prompt_tokens > 10
        with pytest.raises(openai.BadRequestError) as raised:
            await vlserve_client.chat.completions.create(
                model=model_name, messages=image_message(f"{base}/missing.png"), max_tokens=4
            )
    assert raised.value.body["param"].startswith("messages[0].content[1]")


async def test_streaming_with_usage(vlserve_client, model_name):
    stream = await vlserve_client.chat.completions.create(
        model=model_name,
        messages=USER,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


async def test_completions(vlserve_client, model_name):
    completion = await vlserve_client.completions.create(
        model=model_name,
        prompt=["Once upon", "a time"],
        max_tokens=5,
        n=2,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert len(completion.choices) == 4
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage.completion_tokens == 20
    assert all(len(c.logprobs.tokens) == 5 for c in completion.choices)


async def test_tokenize_roundtrip(http, model_name, vlserve_server):
    tokens = (await http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == vlserve_server.state.lifecycle.runtime.max_model_len
    text = (await http.post("/detokenize", json={"tokens": tokens["tokens"], "model": model_name})).json()
    assert text["prompt"] == "hello world"


async def test_errors(vlserve_client, model_name):
    with pytest.raises(openai.NotFoundError):
        await vlserve_client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError) as raised:
        await vlserve_client.chat.completions.create(model=model_name, messages=USER, max_tokens=5000)
    assert raised.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        await vlserve_client.chat.completions.create(
            model=model_name, messages=image_message("data:image/png;base64,AAAA")
        )
    async with openai.AsyncOpenAI(base_url=vlserve_client.base_url, api_key="x", max_retries=0) as other:
        await other.models.list()  # no keys configured: any key is fine


async def _engine_idle(vlserve_server) -> None:
    engine = vlserve_server.state.lifecycle.runtime.engine
    with trio.fail_after(10):
        while (engine.statistics().running, engine.statistics().waiting) != (0, 0):
            await trio.sleep(0.01)


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "non-stream"])
async def test_disconnect_mid_generation_frees_the_engine(vlserve_server, vlserve_base_url, model_name, streaming):
    body = {
        "model": model_name,
        "messages": USER,
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": streaming,
    }
    engine = vlserve_server.state.lifecycle.runtime.engine
    async with httpx.AsyncClient(base_url=vlserve_base_url, timeout=30) as http:
        if streaming:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content"' in line and '"role"' not in line:
                        break
                assert engine.statistics().running == 1
        else:
            with trio.move_on_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(http.post, "/v1/chat/completions", json=body))
                    with trio.fail_after(10):
                        while engine.statistics().running == 0:
                            await trio.sleep(0.005)
                    nursery.cancel_scope.cancel()
    await _engine_idle(vlserve_server)
    assert engine.statistics().generation_tokens < 900


async def test_plugin_default_factory_loads_the_configured_model(vlserve_config):
    """The plugin's own default (the real ``open_runtime``) loads ``config.model`` from disk."""
    from server.serve import run_server

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(run_server, vlserve_config))
            runtime = await server.wait_ready()
            assert runtime.model_name == vlserve_config.model_name
            server.shutdown()
