"""Errors: OpenAI error JSON with the right status and parameter, never a traceback."""

from __future__ import annotations

import dataclasses

import pytest

from tests.server.fakes import FakeRuntime, Script

USER = [{"role": "user", "content": "hi"}]
MAX_BODY = 64 * 1024


@pytest.fixture
def vlserve_config(vlserve_config):
    return dataclasses.replace(vlserve_config, max_body_bytes=MAX_BODY)


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


async def test_unknown_route_is_404(http):
    error = error_of(await http.post("/v1/nope", json={}), 404)
    assert error["message"] == "Invalid URL (POST /v1/nope)"
    assert error["code"] == "not_found"


async def test_wrong_method_is_405_with_allow(http):
    response = await http.get("/v1/chat/completions")
    error = error_of(response, 405)
    assert error["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_unknown_model_is_404_model_not_found(http, path):
    body = {"model": "gpt-9", "messages": USER, "prompt": "x"}
    body.pop("prompt" if "chat" in path else "messages")
    error = error_of(await http.post(path, json=body), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-9" in error["message"]


async def test_unknown_model_retrieve_is_404(http):
    error = error_of(await http.get("/v1/models/gpt-9"), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'],
    ids=["broken", "empty", "not-utf8", "array", "string"],
)
async def test_malformed_body_is_400(http, raw):
    response = await http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice.function.name",
        ),
        ({"parallel_tool_calls": [True]}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "integer", "minimum": 3, "maximum": 1}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logit_bias": {"cat": -100}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-3]}, "stop_token_ids[0]"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
async def test_unsupported_chat_field_is_400_naming_it(http, extra, param):
    error = error_of(await http.post("/v1/chat/completions", json={"messages": USER, **extra}), 400)
    assert error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize(
    "harmless",
    [
        {"tools": []},
        {"tool_choice": "none"},
        {"tool_choice": "auto"},
        {"parallel_tool_calls": False},
        {"response_format": {"type": "text"}},
        {"modalities": ["text"]},
        {"logit_bias": {}},
        {"store": False},
        {"user": "u1", "metadata": {"k": "v"}},
    ],
)
async def test_fields_asking_for_nothing_are_accepted(http, harmless):
    response = await http.post("/v1/chat/completions", json={"messages": USER, **harmless})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"echo": "yes please"}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
    ],
)
async def test_unsupported_completions_field_is_400(http, extra, param):
    error = error_of(await http.post("/v1/completions", json={"prompt": "x", **extra}), 400)
    assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "stop": [""]}, "stop"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": USER, "stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
    ],
)
async def test_invalid_chat_value_is_400_naming_the_param(http, body, param):
    error = error_of(await http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_media_error_from_preparation_keeps_its_param(http):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "bad:image"}},
            ],
        }
    ]
    error = error_of(await http.post("/v1/chat/completions", json={"messages": messages}), 400)
    assert error["param"] == "messages[0].content[1].image_url"
    assert error["code"] == "invalid_image"


async def test_context_length_exceeded(http, fake_runtime: FakeRuntime):
    too_long = "x" * fake_runtime.max_model_len
    body = {"messages": [{"role": "user", "content": too_long}]}
    error = error_of(await http.post("/v1/chat/completions", json=body), 400)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    body = {"messages": USER, "max_tokens": fake_runtime.max_model_len}
    error = error_of(await http.post("/v1/chat/completions", json=body), 400)
    assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
    body = {"messages": USER, "max_completion_tokens": fake_runtime.max_model_len}
    error = error_of(await http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "max_completion_tokens"
    error = error_of(await http.post("/v1/completions", json={"prompt": ["ok", ""]}), 400)
    assert (error["param"], error["code"]) == ("prompt[1]", "empty_prompt")


async def test_body_too_large_is_413(http):
    content = "x" * (MAX_BODY + 1)
    response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    error = error_of(response, 413)
    assert error["code"] == "request_too_large"


async def test_large_body_under_the_limit_is_accepted(http, fake_runtime):
    content = "y" * (MAX_BODY - 200)  # decoded in a worker thread (above INLINE_PARSE_BYTES)
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
    fake_runtime.max_model_len = MAX_BODY
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert fake_runtime.preparer.calls[-1].messages[0].content == content


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_failure_is_500_without_internals(http, fake_runtime, stream):
    fake_runtime.engine.script = Script(fail_after=1)
    response = await http.post("/v1/chat/completions", json={"messages": USER, "stream": stream})
    assert "secret" not in response.text and "Traceback" not in response.text
    if not stream:
        error = error_of(response, 500)
        assert (error["type"], error["code"]) == ("server_error", "internal_error")
        return
    assert response.status_code == 200
    events = [line for line in response.text.split("\n\n") if line]
    assert '"code":"internal_error"' in events[-2]
    assert events[-1] == "data: [DONE]"


async def test_sequence_failed_by_the_engine_is_500(http, fake_runtime):
    fake_runtime.engine.script = Script(error_after=1)
    response = await http.post("/v1/chat/completions", json={"messages": USER})
    error = error_of(response, 500)
    assert "FakeError" not in error["message"]
