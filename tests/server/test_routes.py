"""Routes against the fake runtime, judged by the official ``openai`` client where it can."""

from __future__ import annotations

import openai
import pytest

from tests.server.fakes import FakeRuntime, Script
from vl.chat_messages import Chat, ImagePart, Message, TextPart

USER = [{"role": "user", "content": "hi"}]


async def test_models_list_and_retrieve(vlserve_client, fake_runtime: FakeRuntime):
    models = await vlserve_client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert models.data[0].created == fake_runtime.created
    model = await vlserve_client.models.retrieve("fake-model")
    assert model.owned_by == "vlserve"
    with pytest.raises(openai.NotFoundError):
        await vlserve_client.models.retrieve("other")


async def test_chat_completion_shape(vlserve_client):
    completion = await vlserve_client.chat.completions.create(model="fake-model", messages=USER)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello, world!"
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    assert completion.usage.model_dump() == {
        "prompt_tokens": 2,
        "completion_tokens": 4,
        "total_tokens": 6,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }


async def test_only_responses_that_are_not_streamed_ask_for_final_only_streams(vlserve_client, fake_runtime):
    """A chat or completion that is not streamed opens final-only engine streams (its task
    then wakes once per choice); a streamed one opens ordinary ones."""
    await vlserve_client.chat.completions.create(model="fake-model", messages=USER, n=2)
    await vlserve_client.completions.create(model="fake-model", prompt="hi")
    async for _ in await vlserve_client.chat.completions.create(model="fake-model", messages=USER, stream=True):
        pass
    async for _ in await vlserve_client.completions.create(model="fake-model", prompt="hi", stream=True):
        pass
    assert fake_runtime.engine.final_only == [True, True, True, False, False]


async def test_sampling_fields_reach_the_engine(vlserve_client, fake_runtime):
    await vlserve_client.chat.completions.create(
        model="fake-model",
        messages=USER,
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        n=3,
        stop="END",
        seed=100,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logprobs=True,
        top_logprobs=3,
        user="someone",
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True},
    )
    params = [p for _, p in fake_runtime.engine.opened]
    assert sorted(p.seed for p in params) == [100, 101, 102]
    first = params[0]
    assert (first.max_tokens, first.temperature, first.top_p, first.top_k) == (7, 0.5, 0.9, 5)
    assert (first.min_p, first.repetition_penalty, first.ignore_eos) == (0.1, 1.2, True)
    assert (first.presence_penalty, first.frequency_penalty) == (0.5, -0.5)
    assert first.stop == ("END",) and first.logprobs == 3


async def test_defaults_reach_the_engine(vlserve_client, fake_runtime):
    await vlserve_client.chat.completions.create(model="fake-model", messages=USER, stop=["a", "b"])
    ((_, params),) = fake_runtime.engine.opened
    assert params.max_tokens == fake_runtime.max_model_len - 2  # the whole remaining context
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, 0, None)
    assert params.stop == ("a", "b") and params.logprobs is None


async def test_chat_messages_reach_the_preparer(vlserve_client, fake_runtime):
    image = {"url": "data:image/png;base64,AAAA", "detail": "low"}
    await vlserve_client.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what?"},
                    {"type": "image_url", "image_url": image},
                ],
            },
            {"role": "assistant", "content": "a cat", "name": "bot"},
        ],
    )
    assert fake_runtime.preparer.calls[-1] == Chat(
        (
            Message("system", "be brief"),
            Message("user", (TextPart("what?"), ImagePart(image["url"], "low"))),
            Message("assistant", "a cat"),
        )
    )


async def test_chat_logprobs_shape(vlserve_client, fake_runtime):
    fake_runtime.engine.script = Script(pieces=["é", "b"])
    completion = await vlserve_client.chat.completions.create(
        model="fake-model", messages=USER, logprobs=True, top_logprobs=1
    )
    content = completion.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in content] == [
        ("é", -0.25, [195, 169]),
        ("b", -0.25, [98]),
    ]
    assert [t.top_logprobs[0].token for t in content] == ["alt0", "alt0"]


async def test_chat_stream_with_openai_client(vlserve_client, fake_runtime):
    fake_runtime.engine.script = Script(pieces=["a", "b", "c"])
    stream = await vlserve_client.chat.completions.create(
        model="fake-model", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "abc"
    assert chunks[-1].usage.completion_tokens == 3


async def test_completions(vlserve_client, fake_runtime):
    fake_runtime.engine.script = Script(pieces=["x"] * 40)
    completion = await vlserve_client.completions.create(model="fake-model", prompt=["ab", "cde"], n=2, logprobs=2)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" and c.text == "x" * 16 for c in completion.choices)
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 64
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens[:2] == ["x", "x"] and logprobs.text_offset[:3] == [0, 1, 2]
    assert logprobs.top_logprobs[0] == {"alt0": -1.0, "alt1": -2.0}
    assert {p.max_tokens for _, p in fake_runtime.engine.opened} == {16}


async def test_completions_stream_with_openai_client(vlserve_client):
    stream = await vlserve_client.completions.create(model="fake-model", prompt="hey", stream=True)
    async with stream:
        texts = [chunk.choices[0].text async for chunk in stream]
    assert "".join(texts) == "Hello, world!"


async def test_errors_surface_as_openai_exceptions(vlserve_client):
    with pytest.raises(openai.NotFoundError):
        await vlserve_client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError) as raised:
        await vlserve_client.chat.completions.create(
            model="fake-model",
            messages=USER,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}},
        )
    assert raised.value.body["param"] == "response_format.json_schema.schema"


async def test_tokenize_and_detokenize(http, fake_runtime):
    response = await http.post("/tokenize", json={"prompt": "ab"})
    assert response.json() == {
        "count": 3,
        "max_model_len": fake_runtime.max_model_len,
        "tokens": [1, 97, 98],
        "token_strs": None,
    }
    response = await http.post(
        "/tokenize", json={"prompt": "ab", "add_special_tokens": False, "return_token_strs": True}
    )
    assert response.json()["tokens"] == [97, 98] and response.json()["token_strs"] == ["a", "b"]
    response = await http.post("/tokenize", json={"messages": USER, "model": "fake-model"})
    assert response.json()["tokens"] == [104, 105]
    response = await http.post("/detokenize", json={"tokens": [104, 105]})
    assert response.json() == {"prompt": "hi"}
    response = await http.post("/detokenize", json={"tokens": ["x"]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens[0]"
    response = await http.post("/tokenize", json={"messages": USER, "add_generation_prompt": False})
    assert response.status_code == 400
    response = await http.post("/tokenize", json={"prompt": "x", "model": "other"})
    assert response.status_code == 404
