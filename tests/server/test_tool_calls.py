"""Reading tool calls from fixed model text, whole and streamed, and the chunks the
official client's stream helper assembles (the tiny model writes random text, so the
``auto`` parser is driven with text written here)."""

from __future__ import annotations

import json

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from engine.outputs import StreamDelta
from server.chat_format import ChatChunker, chat_completion
from server.generation import ChoiceResult
from server.response_meta import ResponseMeta
from server.schemas.common import Usage
from server.tool_calls import ArgumentsFragment, CallStart, ParsedCall, ToolMode, ToolStream

AUTO = ToolMode("auto")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
TWO = CALL + "\n" + '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def test_auto_reads_a_hermes_call():
    content, calls, finish = AUTO.parse(CALL, "stop")
    assert content is None and finish == "tool_calls"
    [call] = calls
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 2}


def test_auto_keeps_text_around_calls_and_every_call():
    content, calls, finish = AUTO.parse("Let me check.\n" + TWO + "\n", "stop")
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2 and finish == "tool_calls"


def test_no_parallel_calls_keeps_the_first():
    _, calls, _ = ToolMode("auto", parallel=False).parse(TWO, "stop")
    assert [c.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize(
    "text",
    [
        "just words",
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": 1}',  # left open at the end
        "a < b <tool_ca",
    ],
)
def test_text_that_is_not_a_call_stays_content(text):
    content, calls, finish = AUTO.parse(text, "length")
    assert calls == [] and content == text and finish == "length"


def test_arguments_given_as_a_json_string_are_accepted():
    _, [call], _ = AUTO.parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "stop")
    assert json.loads(call.arguments) == {"a": 1}


def test_a_call_cut_by_the_length_limit_keeps_finish_reason_length():
    _, calls, finish = AUTO.parse(CALL, "length")
    assert len(calls) == 1 and finish == "length"


def test_none_and_required_and_named():
    assert ToolMode("none").parse(CALL, "stop") == (CALL, [], "stop")
    content, calls, finish = ToolMode("required").parse(
        '[{"name":"f","parameters":{"a":1}},{"name":"g","parameters":{}}]', "stop"
    )
    assert content is None and [c.name for c in calls] == ["f", "g"] and finish == "tool_calls"
    assert json.loads(calls[0].arguments) == {"a": 1}
    assert ToolMode("required").parse('[{"name":"f","par', "length") == ('[{"name":"f","par', [], "length")
    content, [call], finish = ToolMode("named", "f").parse('{"a":1}', "stop")
    assert content is None and call.name == "f" and call.arguments == '{"a":1}' and finish == "stop"


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamed_auto_equals_whole(step):
    """Fed in pieces of any size, the stream yields the same content and calls as the whole
    text, and holds back only what may still open a call."""
    text = "Sure <b> " + TWO + " done <tool_ca"
    stream = ToolStream(AUTO)
    events = []
    for i in range(0, len(text), step):
        events += stream.feed(text[i : i + step])
    events += stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ParsedCall)]
    assert content == "Sure <b> \n done <tool_ca"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {"zone": "UTC"}),
    ]


def test_plain_text_streams_without_delay():
    stream = ToolStream(AUTO)
    assert stream.feed("Hello") == ["Hello"]
    assert stream.feed(" <tool") == [" "]  # "<tool" may open a call: held
    assert stream.feed("box>") == ["<toolbox>"]


def test_streamed_auto_sends_the_name_then_argument_fragments_while_the_call_is_written():
    """Fed a character at a time, a call's head comes as soon as its arguments object
    opens (long before the block closes), then the arguments in several fragments; joined,
    they are the arguments exactly as written, as in the whole response."""
    stream = ToolStream(AUTO, fragments=True)
    events: list = []
    head_at = None
    for i, char in enumerate(CALL):
        events += stream.feed(char)
        if head_at is None and any(isinstance(e, CallStart) for e in events):
            head_at = i
    events += stream.finish()
    assert head_at is not None and head_at < CALL.index("Paris")
    start, *fragments = events
    assert start == CallStart(start.id, "get_weather") and start.id.startswith("call_")
    assert all(isinstance(f, ArgumentsFragment) for f in fragments) and len(fragments) > 10
    joined = "".join(f.text for f in fragments)
    assert joined == '{"city": "Paris", "days": 2}'
    assert AUTO.parse(CALL, "stop")[1][0].arguments == joined
    assert stream.finish_reason("stop") == "tool_calls"


def test_whole_calls_keep_the_arguments_as_written():
    text = '<tool_call>{"name": "f", "arguments": {"b":1,  "a" : [1, 2]} }</tool_call>'
    assert AUTO.parse(text, "stop")[1][0].arguments == '{"b":1,  "a" : [1, 2]}'
    other_order = '<tool_call>{"arguments": {"b": 1}, "name": "f"}</tool_call>'
    assert AUTO.parse(other_order, "stop")[1][0].arguments == '{"b": 1}'


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ('<tool_call>{"arguments": {"b": 1}, "name": "f"}</tool_call>', ""),  # no head to stream: sent whole
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>"),
        ('<tool_call>{"nam', '<tool_call>{"nam'),  # cut before the head: content, as whole
    ],
)
def test_streamed_blocks_without_a_head_are_read_whole(text, content):
    stream = ToolStream(AUTO, fragments=True)
    events = [e for char in text for e in stream.feed(char)] + stream.finish()
    assert "".join(e for e in events if isinstance(e, str)) == content
    assert not any(isinstance(e, (CallStart, ArgumentsFragment)) for e in events)


META = ResponseMeta.new("chatcmpl", "m")


def delta(text: str, finish: str | None = None) -> StreamDelta:
    return StreamDelta(text, [1], None, finish, 3, 1)


def assembled(mode: ToolMode, pieces: list[str], finish: str = "stop"):
    """The completion the official client's stream state builds from our chunks."""
    chunker = ChatChunker(META, include_usage=False, logprobs=False, tools=mode)
    chunks = chunker.start(0)
    for i, piece in enumerate(pieces):
        chunks += chunker.for_delta(0, delta(piece, finish if i == len(pieces) - 1 else None))
    state = ChatCompletionStreamState()
    events = []
    for chunk in chunks:
        events += state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion(), events


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_stream_helper_assembles_auto_calls(step):
    text = "Checking. " + TWO
    completion, events = assembled(AUTO, [text[i : i + step] for i in range(0, len(text), step)])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking. \n"
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(choice.message.tool_calls[1].function.arguments) == {"zone": "UTC"}
    done = [e.name for e in events if e.type == "tool_calls.function.arguments.done"]
    assert done == ["get_weather", "get_time"]
    whole = AUTO.parse(text, "stop")[1]
    assert [c.function.arguments for c in choice.message.tool_calls] == [c.arguments for c in whole]
    fragments = [e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"]
    if step == 1:
        assert len(fragments) > 20  # argument text streamed as written, not one piece per call


def test_stream_helper_assembles_a_named_call_from_argument_fragments():
    completion, events = assembled(ToolMode("named", "f"), ['{"a"', ":", "1}"])
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "f" and call.function.arguments == '{"a":1}' and call.id.startswith("call_")
    fragments = [e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert fragments[0] == ""  # the head (id, name) carries empty arguments, as OpenAI sends it
    assert fragments[1:] == ['{"a"', ":", "1}"]
    assert completion.choices[0].finish_reason == "stop"


def test_whole_response_carries_tool_calls_and_omits_them_when_none():
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    with_calls = chat_completion(META, [ChoiceResult(0, [CALL], [], None, "stop")], usage, logprobs=False, tools=AUTO)
    message = json.loads(with_calls.model_dump_json())["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None
    assert message["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    plain = chat_completion(META, [ChoiceResult(0, ["hi"], [], None, "stop")], usage, logprobs=False)
    assert "tool_calls" not in json.loads(plain.model_dump_json())["choices"][0]["message"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


async def test_auto_tool_calls_through_the_official_client(vlserve_client, fake_runtime):
    """With ``tools`` (``tool_choice`` auto by default) the model's Hermes blocks reach the
    client as ``tool_calls``, whole and streamed, and no grammar is sent to the engine."""
    text = "Checking. " + CALL
    fake_runtime.engine.script.pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    completion = await vlserve_client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert fake_runtime.engine.opened[-1][1].grammar is None
    async with vlserve_client.beta.chat.completions.stream(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER]
    ) as stream:
        final = await stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    # accumulating the raw deltas: the name and id first, then several argument fragments
    stream = await vlserve_client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], stream=True
    )
    async with stream:
        calls = [c for chunk in [chunk async for chunk in stream] for c in chunk.choices[0].delta.tool_calls or []]
    head, *rest = calls
    assert head.id.startswith("call_") and head.function.name == "get_weather" and head.function.arguments == ""
    assert len(rest) > 3 and all(c.id is None and c.function.name is None for c in rest)
    assert "".join(c.function.arguments for c in rest) == call.function.arguments


async def test_tool_choice_none_leaves_calls_as_text(vlserve_client, fake_runtime):
    fake_runtime.engine.script.pieces = [CALL]
    completion = await vlserve_client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="none"
    )
    assert completion.choices[0].message.content == CALL and completion.choices[0].message.tool_calls is None
