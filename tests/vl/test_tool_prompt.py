"""Tools in the prompt: the template's own ``tools`` variable, or the default Hermes block."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from vl.chat_messages import Chat, Message, ToolCall
from vl.media_policy import MediaPolicy
from vl.prep_tools import PrepTools, RenderChat
from vl.tool_prompt import TOOLS_FOOTER, TOOLS_HEADER

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CHAT = Chat(
    (
        Message("user", "Weather in Paris?"),
        Message("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        Message("tool", "sunny", (), "call_1"),
    ),
    (TOOL,),
)


@pytest.fixture
def tokenizer(tiny_model):
    return copy.deepcopy(tiny_model.tokenizer)


def rendered(tokenizer, chat: Chat) -> str:
    ids = RenderChat(chat.template_messages()).run(PrepTools(tokenizer, MediaPolicy()))
    return tokenizer.decode(ids)


def test_template_without_tools_gets_the_default_hermes_block(tokenizer):
    """The tiny model's template knows only roles and text: the tools go into an added
    system message, the assistant's call and the tool's result become Hermes text."""
    text = rendered(tokenizer, CHAT)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n" + TOOLS_HEADER)
    assert "\n" + json.dumps(TOOL) + "\n" + TOOLS_FOOTER + "<|im_end|>" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_an_existing_system_message_gets_the_block_appended(tokenizer):
    chat = Chat((Message("system", "Be brief."), Message("user", "hi")), (TOOL,))
    assert rendered(tokenizer, chat).startswith("<|im_start|>system\nBe brief.\n\n" + TOOLS_HEADER)


def test_a_chat_without_tools_renders_as_before(tokenizer):
    chat = Chat((Message("user", "hi"),))
    assert rendered(tokenizer, chat) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_that_renders_tools_gets_them_and_the_messages_as_they_are(tokenizer):
    """A template that uses ``tools`` gets the definitions in that variable and the tool
    messages in Hugging Face's form (arguments as an object)."""
    tokenizer.chat_template = (
        "{{ tools | tojson }}|{% for m in messages %}{{ m.role }}:"
        "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% endif %}"
        "{{ m.tool_call_id or '' }}{{ m.content }};{% endfor %}"
    )
    text = rendered(tokenizer, CHAT)
    tools, history = text.split("|")
    assert json.loads(tools) == [TOOL]
    assert history == "user:Weather in Paris?;assistant:Paris;tool:call_1sunny;"


def test_render_step_with_tools_pickles():
    step = RenderChat(CHAT.template_messages())
    again = pickle.loads(pickle.dumps(step))
    assert again == step and again.messages.tools == [TOOL]
