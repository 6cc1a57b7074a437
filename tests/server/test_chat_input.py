"""Chat messages are validated once, by the request schema, as OpenAI validates them.

The preparer receives a typed ``vl.chat_messages.Chat`` built from the validated request and
never sees a message the schema rejected. Cases where the old second validation in ``vl``
disagreed with the schema are pinned here.
"""

from __future__ import annotations

import pytest

from server.request_body import parse_chat
from tests.server.fakes import FakeRuntime
from vl.chat_messages import Chat, ImagePart, Message, TextPart, ToolCall
from vl.errors import InvalidRequest

USER = {"role": "user", "content": "hi"}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def error_of(response, status=400):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "assistant",
    [
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "assistant", "content": None, "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "assistant", "content": "ok", "refusal": None, "function_call": None, "audio": None},
    ],
    ids=["content-null", "content-absent", "tool-calls-null", "tool-calls-empty", "null-extras"],
)
async def test_assistant_message_without_content_is_accepted(http, fake_runtime: FakeRuntime, assistant):
    """OpenAI makes ``content`` optional and nullable on assistant messages; such a message
    reaches the preparer with empty (or its own) content."""
    response = await http.post("/v1/chat/completions", json={"messages": [USER, assistant, USER]})
    assert response.status_code == 200, response.text
    chat = fake_runtime.preparer.calls[-1]
    assert chat.messages[1] == Message("assistant", assistant.get("content") or "")


@pytest.mark.parametrize(
    ("message", "param", "words"),
    [
        (
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            "messages[1].function_call",
            "not supported",
        ),
        ({"role": "assistant", "content": "x", "audio": {"id": "audio_1"}}, "messages[1].audio", "not supported"),
        ({"role": "user", "content": "x", "tool_calls": [TOOL_CALL]}, "messages[1].tool_calls", "Unrecognized"),
        ({"role": "user", "content": "x", "refusal": "no"}, "messages[1].refusal", "Unrecognized"),
        ({"role": "user", "content": None}, "messages[1].content", "Missing"),
        ({"role": "system"}, "messages[1].content", "Missing"),
        ({"role": "tool", "content": "42"}, "messages[1].tool_call_id", "Missing"),
        ({"role": "user", "content": "x", "tool_call_id": "call_1"}, "messages[1].tool_call_id", "Unrecognized"),
        ({"role": "function", "content": "42"}, "messages[1].role", "role"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{**TOOL_CALL, "function": {"name": "f"}}]},
            "messages[1].tool_calls[0].function.arguments",
            "Missing",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]},
            "messages[1].content[0].image_url",
            "image_url",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]},
            "messages[1].content[0].image_url.detail",
            "detail",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]},
            "messages[1].content[0].extra",
            "Unrecognized",
        ),
    ],
    ids=[
        "assistant-function-call",
        "assistant-audio",
        "user-tool-calls",
        "user-refusal",
        "user-content-null",
        "system-content-absent",
        "tool-without-call-id",
        "user-with-call-id",
        "function-role",
        "tool-call-without-arguments",
        "image-url-string",
        "bad-detail",
        "extra-part-field",
    ],
)
async def test_rejected_messages_never_reach_the_preparer(http, fake_runtime: FakeRuntime, message, param, words):
    """A message the schema rejects is a 400 naming its field, decided before preparation
    starts: the preparer is not entered (there is no second check below to disagree)."""
    error = error_of(await http.post("/v1/chat/completions", json={"messages": [USER, message]}))
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]
    assert fake_runtime.preparer.entered == 0 and fake_runtime.preparer.calls == []


async def test_unsupported_message_field_is_named_by_its_path(http):
    message = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    error = error_of(await http.post("/v1/chat/completions", json={"messages": [USER, message]}))
    assert error["message"] == "'messages[1].function_call' is not supported by this server."


async def test_tool_conversation_reaches_the_preparer_typed(http, fake_runtime: FakeRuntime):
    """An assistant message with ``tool_calls`` and ``content: null``, then the ``tool``
    message answering it, arrive as typed messages; the tools travel with the chat."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]
    messages.append({"role": "tool", "content": "42", "tool_call_id": "call_1"})
    response = await http.post("/v1/chat/completions", json={"messages": messages, "tools": [tool]})
    assert response.status_code == 200, response.text
    chat = fake_runtime.preparer.calls[-1]
    assert chat.messages[1] == Message("assistant", "", (ToolCall("call_1", "f", "{}"),))
    assert chat.messages[2] == Message("tool", "42", (), "call_1")
    assert chat.tools == (tool,)


async def test_a_returned_assistant_message_can_be_sent_back(vlserve_client, fake_runtime: FakeRuntime):
    """The assistant message a client was given (``refusal: null`` included, as the openai
    client sends it back) is valid history in the next request."""
    first = await vlserve_client.chat.completions.create(model="fake-model", messages=[USER])
    returned = first.choices[0].message.model_dump(exclude_unset=True)
    assert "refusal" in returned
    await vlserve_client.chat.completions.create(model="fake-model", messages=[USER, returned, USER])
    assert fake_runtime.preparer.calls[-1].messages[1] == Message("assistant", first.choices[0].message.content)


async def test_tokenize_takes_the_same_typed_chat(http, fake_runtime: FakeRuntime):
    """``/tokenize`` with messages validates them with the chat schema: the same null
    assistant content is accepted, the same bad tool call refused."""
    ok = await http.post("/tokenize", json={"messages": [USER, {"role": "assistant", "content": None}]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["count"] == 2  # "hi" + "" in the fake's one-token-per-character count
    bad = await http.post(
        "/tokenize", json={"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]}
    )
    assert error_of(bad)["param"] == "messages[1].tool_calls[0].function"


def test_parse_chat_builds_the_typed_chat():
    """Developer becomes system, ``name`` is dropped, image detail defaults to ``auto``, and
    every image is named by its request field."""
    chat = parse_chat(
        [
            {"role": "developer", "content": "be brief", "name": "ops"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": "https://a.example/1.png"}},
                    {"type": "image_url", "image_url": {"url": "https://a.example/2.png", "detail": "high"}},
                ],
            },
        ]
    )
    assert chat == Chat(
        (
            Message("system", "be brief"),
            Message(
                "user",
                (
                    TextPart("compare"),
                    ImagePart("https://a.example/1.png", "auto"),
                    ImagePart("https://a.example/2.png", "high"),
                ),
            ),
        )
    )
    assert [ref.param for ref in chat.images()] == [
        "messages[1].content[1].image_url",
        "messages[1].content[2].image_url",
    ]


def test_parse_chat_raises_invalid_request_naming_the_field():
    with pytest.raises(InvalidRequest) as info:
        parse_chat([USER, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert info.value.param == "messages[1].content[0].image_url.url"
    with pytest.raises(InvalidRequest) as info:
        parse_chat([])
    assert info.value.param == "messages"
