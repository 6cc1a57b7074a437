"""Grammars for response_format and tool_choice: which schema, built off the event loop
under a gate, cached, and a bad schema a 400 naming its field."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from server.schemas.chat import ChatCompletionRequest
from server.structured_output import (
    MAX_PARALLEL_CALLS,
    NUMBER_STEP,
    GrammarValidator,
    bounded_numbers,
    output_schema,
    tool_mode,
)
from vl.errors import InvalidRequest

USER = [{"role": "user", "content": "hi"}]
F = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}},
}
G = {"type": "function", "function": {"name": "g"}}


def request(**fields) -> ChatCompletionRequest:
    body = ChatCompletionRequest.model_validate({"messages": USER, **fields})
    body.check_combinations()
    return body


def test_which_schema_each_request_asks_for():
    assert output_schema(request()) is None
    assert output_schema(request(response_format={"type": "text"})) is None
    assert output_schema(request(response_format={"type": "json_object"})) == ({"type": "object"}, "response_format")
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert output_schema(request(response_format=fmt)) == (schema, "response_format.json_schema.schema")
    assert output_schema(request(tools=[F, G])) is None  # auto: free text, parsed afterwards
    named = request(tools=[F, G], tool_choice={"type": "function", "function": {"name": "g"}})
    assert output_schema(named) == (
        {"type": "object", "properties": {}, "additionalProperties": False},
        "tools[1].function.parameters",
    )
    required, param = output_schema(request(tools=[F, G], tool_choice="required"))
    assert param == "tools" and required["minItems"] == 1 and required["maxItems"] == MAX_PARALLEL_CALLS
    assert [item["properties"]["name"]["enum"] for item in required["items"]["anyOf"]] == [["f"], ["g"]]
    single, _ = output_schema(request(tools=[F], tool_choice="required", parallel_tool_calls=False))
    assert single["maxItems"] == 1


def test_tool_mode_follows_tool_choice():
    assert tool_mode(request()).mode == "none"
    assert tool_mode(request(tools=[F])).mode == "auto"
    assert tool_mode(request(tools=[F], tool_choice="none")).mode == "none"
    named = tool_mode(request(tools=[F], tool_choice={"type": "function", "function": {"name": "f"}}))
    assert (named.mode, named.function) == ("named", "f")
    assert tool_mode(request(tools=[F], parallel_tool_calls=False)).parallel is False


def test_numbers_get_a_step_and_literals_are_left_alone():
    schema = {
        "type": "object",
        "properties": {
            "x": {"type": "number"},
            "y": {"type": ["number", "null"]},
            "z": {"type": "number", "multipleOf": 0.5},
            "e": {"enum": [{"type": "number"}]},
        },
    }
    out = bounded_numbers(schema)
    assert out["properties"]["x"]["multipleOf"] == NUMBER_STEP and out["properties"]["y"]["multipleOf"] == NUMBER_STEP
    assert out["properties"]["z"]["multipleOf"] == 0.5 and out["properties"]["e"] == schema["properties"]["e"]
    assert "multipleOf" not in schema["properties"]["x"]  # a copy


async def test_bad_schema_is_invalid_request_naming_the_field():
    validator = GrammarValidator()
    with pytest.raises(InvalidRequest) as raised:
        await validator.grammar({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "p.q")
    assert raised.value.param == "p.q" and "missing" in str(raised.value)


async def test_grammars_are_cached_by_schema(monkeypatch):
    import server.structured_output as module

    built = []
    real = module.build_grammar
    monkeypatch.setattr(module, "build_grammar", lambda text, param: built.append(text) or real(text, param))
    validator = GrammarValidator()
    first = await validator.grammar(
        {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}, "p"
    )
    again = await validator.grammar(
        {"properties": {"a": {"type": "integer"}}, "required": ["a"], "type": "object"}, "p"
    )
    assert first == again and len(built) == 1


async def test_a_cancelled_build_keeps_its_gate_token_until_the_thread_returns(monkeypatch):
    """Invariant: a build cancelled mid-compile keeps the gate's token until its thread
    returns; then the gate is full again and the only trace is the finished grammar in
    the bounded cache, which the next request with that schema reuses."""
    import server.structured_output as module

    release, started = threading.Event(), threading.Event()
    real = module.build_grammar

    def slow(text, param):
        started.set()
        release.wait(10)
        return real(text, param)

    monkeypatch.setattr(module, "build_grammar", slow)
    validator = GrammarValidator()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(validator.grammar, {"type": "boolean"}, "p")
            await trio.to_thread.run_sync(started.wait)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert validator.gate.borrowed_tokens == 1  # the thread still works, holding it
            release.set()
    assert validator.gate.borrowed_tokens == 0 and len(validator._cache) <= 1
    monkeypatch.setattr(module, "build_grammar", real)
    assert await validator.grammar({"type": "boolean"}, "p")
    assert validator.gate.borrowed_tokens == 0 and len(validator._cache) == 1
