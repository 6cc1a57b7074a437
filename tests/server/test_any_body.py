"""No body makes the server fail: every body gets a 2xx or an OpenAI-style 4xx, never a
5xx, and the server keeps serving. Hand-picked pathological bodies, then bodies that
hypothesis derives from valid ones (wrong types anywhere, unknown and missing fields,
arbitrary JSON), against the real app on the fake runtime."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from server.request_body import MAX_JSON_DEPTH

USER = [{"role": "user", "content": "hi"}]
JSON_HEADERS = {"content-type": "application/json"}

# a valid body per route: the starting points hypothesis breaks
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                ],
            },
        ],
        "mm_processor_kwargs": {"max_pixels": 100_000},
        "max_tokens": 4,
        "temperature": 0.5,
        "stop": ["x"],
        "logit_bias": {"5": 1.0},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
    },
    "/v1/completions": {"model": "fake-model", "prompt": "hello", "max_tokens": 3, "n": 2, "seed": 7},
    "/tokenize": {"model": "fake-model", "prompt": "hello"},
    "/detokenize": {"model": "fake-model", "tokens": [104, 105]},
}


def assert_not_failed(response: httpx.Response) -> None:
    """A 2xx, or a 4xx whose body is exactly OpenAI's error shape."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)


async def assert_still_serving(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200
    response = await http.post("/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 200, response.text


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


PATHOLOGICAL: dict[str, tuple[str, bytes]] = {
    "nesting-20000": ("/v1/chat/completions", b'{"messages":' + b"[" * 20000 + b"]" * 20000 + b"}"),
    "nesting-900": ("/v1/chat/completions", chat(metadata=nested(900))),
    "nesting-over-limit": ("/v1/chat/completions", chat(user=nested(MAX_JSON_DEPTH + 1))),
    "deep-schema": (
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": nested_schema(30)}}),
    ),
    "deep-tool-schema": (
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": nested_schema(31)}}]),
    ),
    "int-2^64": ("/v1/chat/completions", chat(seed=2**64)),
    "int-u64-max-n2": ("/v1/completions", json.dumps({"prompt": "x", "seed": 2**64 - 1, "n": 2}).encode()),
    "int-5000-digits": ("/v1/chat/completions", b'{"messages":[],"max_tokens":' + b"9" * 5000 + b"}"),
    "int-huge-max-tokens": ("/v1/chat/completions", chat(max_tokens=10**18)),
    "float-1e999": ("/v1/chat/completions", b'{"messages":[],"temperature":1e999}'),
    "float-1e308": ("/v1/chat/completions", chat(temperature=1e308)),
    "nan": ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}'),
    "infinity": ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi"}],"top_p":-Infinity}'),
    "invalid-utf8": ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"\xff\xfe"}]}'),
    "lone-surrogate": ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"\\ud800"}]}'),
    "surrogate-model": ("/v1/models/x", b""),
    "wrong-type-top": ("/v1/chat/completions", b'{"messages":{"role":"user"}}'),
    "wrong-type-deep": ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": 3}]}])),
    "bool-as-int": ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": True}).encode()),
    "null-everywhere": ("/v1/chat/completions", chat(messages=[None], tools=[None], stop=[None])),
    "gigantic-messages": ("/v1/chat/completions", chat(messages=USER * 100_000)),
    "gigantic-stop": ("/v1/chat/completions", chat(stop=["x"] * 100_000)),
    "gigantic-logit-bias": ("/v1/chat/completions", chat(logit_bias={str(i): 1 for i in range(100_000)})),
    "logit-bias-long-key": ("/v1/chat/completions", chat(logit_bias={"1" * 5000: 1})),
    "gigantic-prompt-ids": ("/v1/completions", json.dumps({"prompt": list(range(200_000))}).encode()),
    "prompt-id-too-big": ("/v1/completions", json.dumps({"prompt": [2**63]}).encode()),
    "detokenize-huge-ids": ("/detokenize", json.dumps({"tokens": [2**64 - 1, -(2**63), 0xD800]}).encode()),
    "tokenize-wrong": ("/tokenize", json.dumps({"messages": [{"role": "tool", "content": 1}]}).encode()),
    "schema-not-a-schema": (
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
    ),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
async def test_pathological_body_is_a_4xx_and_the_server_keeps_serving(http, name):
    path, raw = PATHOLOGICAL[name]
    if name == "surrogate-model":
        response = await http.get("/v1/models/%ED%A0%80")  # a lone surrogate, UTF-8 encoded
    else:
        response = await http.post(path, content=raw, headers=JSON_HEADERS)
    assert_not_failed(response)
    await assert_still_serving(http)


async def test_rules_name_what_broke(http):
    """The body rules say which one the body broke, and where."""
    deep = (await http.post("/v1/chat/completions", content=chat(user=nested(MAX_JSON_DEPTH + 1)))).json()
    assert deep["error"]["code"] == "invalid_json" and "nests deeper" in deep["error"]["message"]
    assert deep["error"]["param"] == "user"
    big = (await http.post("/v1/chat/completions", content=chat(seed=2**64))).json()
    assert big["error"]["code"] == "number_out_of_range" and big["error"]["param"] == "seed"
    nan = await http.post("/v1/chat/completions", content=b'{"messages":[],"temperature":NaN}')
    assert nan.status_code == 400 and nan.json()["error"]["code"] == "invalid_json"
    duplicate = b'{"messages":1,"messages":[{"role":"user","content":"hi"}]}'
    assert (await http.post("/v1/chat/completions", content=duplicate)).status_code == 200  # the last one counts


# --- property-based ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``value`` (dict keys and list indices), the root excluded."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(paths_of(child, (*prefix, key)))
    return out


@st.composite
def broken_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid body with one to three of: a value replaced by arbitrary JSON, a field
    dropped, a field added (an unknown one or a known field of another route)."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = copy.deepcopy(VALID[path])
    known = sorted({key for valid in VALID.values() for key in valid} | {"stream", "n", "echo", "logprobs"})
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        paths = paths_of(body)
        if action == "add" or not paths:
            key = draw(st.sampled_from(known) | st.text(max_size=8))
            body[key] = draw(JSON_VALUES)
            continue
        where = draw(st.sampled_from(paths))
        parent = body
        for key in where[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[where[-1]] = draw(JSON_VALUES)
        else:
            del parent[where[-1]]
    return path, body


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, database=None)


async def run_property(http: httpx.AsyncClient, strategy: st.SearchStrategy[Any], check) -> None:
    """Run ``check(http, example)`` for each example hypothesis draws from ``strategy``.

    Hypothesis drives from a worker thread and each example runs back on this trio loop,
    so every example meets the same running server (which must keep serving)."""

    @PROPERTY_SETTINGS
    @given(example=strategy)
    def examples(example: Any) -> None:
        trio.from_thread.run(check, http, example)

    await trio.to_thread.run_sync(examples)
    await assert_still_serving(http)


async def _post_broken(http: httpx.AsyncClient, case: tuple[str, dict[str, Any]]) -> None:
    path, body = case
    assert_not_failed(await http.post(path, json=body))


async def test_broken_valid_bodies_never_fail(http):
    await run_property(http, broken_bodies(), _post_broken)


ANY_OBJECT = st.tuples(
    st.sampled_from(sorted(VALID)),
    st.dictionaries(st.sampled_from(sorted({k for v in VALID.values() for k in v} | {"stream"})), JSON_VALUES),
)


async def test_arbitrary_json_objects_never_fail(http):
    await run_property(http, ANY_OBJECT, _post_broken)
