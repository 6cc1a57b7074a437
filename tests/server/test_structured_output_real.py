"""Structured output and tools on the real tiny model, judged by the official client.

The tiny model writes random text, so every test here that expects JSON or a tool call
forces it by constrained decoding (``response_format`` or a forcing ``tool_choice``): if
the grammar mask were not applied, the output would not parse. Free ``auto`` tool calls
are covered with fixed text in ``tests/server/test_tool_calls.py``.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.real_runtime import model_name, vlserve_config, vlserve_runtime_factory  # noqa: F401

USER = [{"role": "user", "content": "Fill in the form."}]
STRING = re.compile(r'"(?:\\.|[^"\\])*"')
BUDGET = 256  # far more than a compact answer to any schema below needs


class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Paint(BaseModel):
    colour: Colour
    glossy: bool


class Point(BaseModel):
    x: int = Field(ge=-5, le=5)
    y: float = Field(ge=0, le=1)


class Shape(BaseModel):
    name: str = Field(max_length=6)
    corners: list[Point] = Field(max_length=3)
    fill: Paint


class Measurement(BaseModel):
    value: float = Field(ge=10, le=20)
    count: int = Field(ge=0, le=9)
    unit: Colour | None


SCHEMAS = [Paint, Point, Shape, Measurement]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
async def test_parse_returns_a_parsed_object(vlserve_client, model_name, schema):
    """``beta.chat.completions.parse`` with a pydantic model gets an instance of it; the
    compact grammar makes the model finish (``stop``) well inside the budget."""
    for temperature in (0.0, 1.0):
        completion = await vlserve_client.beta.chat.completions.parse(
            model=model_name, messages=USER, response_format=schema, max_tokens=BUDGET, temperature=temperature, seed=7
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, schema)
        assert not re.search(r"\s", STRING.sub("", choice.message.content))  # no free whitespace
        assert completion.usage.completion_tokens < BUDGET


@pytest.mark.parametrize("schema", [Shape, Measurement], ids=lambda s: s.__name__)
async def test_streamed_parse_assembles_a_parsed_object(vlserve_client, model_name, schema):
    async with vlserve_client.beta.chat.completions.stream(
        model=model_name, messages=USER, response_format=schema, max_tokens=BUDGET, temperature=1.0, seed=3
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, schema)


async def test_json_object_is_a_json_object(vlserve_client, model_name):
    for stream in (False, True):
        response = await vlserve_client.chat.completions.create(
            model=model_name,
            messages=USER,
            response_format={"type": "json_object"},
            max_tokens=BUDGET,
            temperature=0.7,
            seed=11,
            stream=stream,
        )
        if stream:
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in response if chunk.choices])
        else:
            text = response.choices[0].message.content
        if text.count("{") and len(text) < BUDGET:  # the model closed it within the budget
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def check_weather_arguments(arguments: str) -> None:
    value = json.loads(arguments)
    assert value["city"] in ("Paris", "Oslo") and 1 <= value["days"] <= 7


async def test_named_tool_choice_forces_valid_arguments(vlserve_client, model_name):
    completion = await vlserve_client.chat.completions.create(
        model=model_name,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=BUDGET,
        temperature=1.0,
        seed=5,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    check_weather_arguments(call.function.arguments)


async def test_required_tool_choice_returns_tool_calls(vlserve_client, model_name):
    completion = await vlserve_client.chat.completions.create(
        model=model_name,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=BUDGET,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    else:
        assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_streamed_tool_calls_assemble_in_the_stream_helper(vlserve_client, model_name, tool_choice):
    """The official client's stream helper assembles the ``tool_calls`` deltas (name first,
    then argument fragments) into the same calls a whole response has."""
    async with vlserve_client.beta.chat.completions.stream(
        model=model_name,
        messages=USER,
        tools=[WEATHER],
        tool_choice=tool_choice,
        max_tokens=BUDGET,
        temperature=1.0,
        seed=9,
    ) as stream:
        names = [event.name async for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert names == ["get_weather"] * len(calls) and calls
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        check_weather_arguments(call.function.arguments)


async def test_tool_conversation_round_trip(vlserve_client, model_name):
    """A call the server returned, sent back with the tool's result, is a valid next turn
    (multi-turn tool conversation through the default tool prompt)."""
    first = await vlserve_client.chat.completions.create(
        model=model_name,
        messages=USER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=BUDGET,
        temperature=0,
    )
    message = first.choices[0].message
    history = [*USER, message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temp": 21}'})
    again = await vlserve_client.chat.completions.create(
        model=model_name, messages=history, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert again.usage.prompt_tokens > first.usage.prompt_tokens


async def test_invalid_schema_is_a_400_naming_the_field(vlserve_client, model_name):
    with pytest.raises(openai.BadRequestError) as raised:
        await vlserve_client.chat.completions.create(
            model=model_name,
            messages=USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "integer", "minimum": 3, "maximum": 1}},
            },
        )
    assert raised.value.body["param"] == "response_format.json_schema.schema"
    assert "minimum" in raised.value.body["message"]
