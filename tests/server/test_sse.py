"""SSE framing of streamed chat and text completions (OpenAI's chunk sequence)."""

from __future__ import annotations

import httpx

from tests.server.fakes import FakeRuntime, Script
from tests.server.sse_client import parse_events

USER = [{"role": "user", "content": "hi"}]


async def stream_events(http: httpx.AsyncClient, path: str, body: dict):
    response = await http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    return parse_events(response.text)


async def test_chat_stream_role_content_finish_usage_done(http, fake_runtime: FakeRuntime):
    fake_runtime.engine.script = Script(pieces=["Hel", "lo", "!"])
    body = {"messages": USER, "stream_options": {"include_usage": True}}
    events, done = await stream_events(http, "/v1/chat/completions", body)
    assert done
    ids = {event["id"] for event in events}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert all("usage" in event for event in events)
    first, *middle, finish, usage = events
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert [e["choices"][0]["delta"] for e in middle] == [{"content": c} for c in ["Hel", "lo", "!"]]
    assert all(e["usage"] is None for e in [first, *middle, finish])
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_chat_stream_without_usage_has_no_usage_key(http):
    events, done = await stream_events(http, "/v1/chat/completions", {"messages": USER})
    assert done
    assert all("usage" not in event for event in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_n_choices_each_framed(http, fake_runtime):
    fake_runtime.engine.script = Script(pieces=["a", "b"])
    body = {"messages": USER, "n": 3, "stream_options": {"include_usage": True}}
    events, done = await stream_events(http, "/v1/chat/completions", body)
    assert done
    per_choice: dict[int, list] = {0: [], 1: [], 2: []}
    for event in events[:-1]:
        (choice,) = event["choices"]
        per_choice[choice["index"]].append(choice)
    for choices in per_choice.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in choices) == "ab"
        assert choices[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


async def test_chat_stream_length_finish_and_logprobs(http, fake_runtime):
    fake_runtime.engine.script = Script(pieces=["a", "b", "c"])
    body = {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    events, _ = await stream_events(http, "/v1/chat/completions", body)
    content = [e["choices"][0] for e in events if e["choices"][0]["delta"].get("content")]
    assert [c["logprobs"]["content"][0]["token"] for c in content] == ["a", "b"]
    assert all(len(c["logprobs"]["content"][0]["top_logprobs"]) == 2 for c in content)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_completions_stream(http, fake_runtime):
    fake_runtime.engine.script = Script(pieces=["x", "y"])
    body = {
        "prompt": ["p1", "p2"],
        "n": 2,
        "stream_options": {"include_usage": True},
        "logprobs": 1,
    }
    events, done = await stream_events(http, "/v1/completions", body)
    assert done
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in events)
    texts: dict[int, str] = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert choice["logprobs"]["tokens"] == [choice["text"]]
    assert texts == {0: "xy", 1: "xy", 2: "xy", 3: "xy"}
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}


async def test_engine_refusal_mid_stream_is_an_error_event(http, fake_runtime):
    fake_runtime.max_model_len = 1 << 30  # let the request past our own length check
    body = {"messages": USER, "max_tokens": 1 << 21}
    events, done = await stream_events(http, "/v1/chat/completions", body)
    assert done
    assert events[-1]["error"]["param"] == "max_tokens"
    assert events[-1]["error"]["type"] == "invalid_request_error"
