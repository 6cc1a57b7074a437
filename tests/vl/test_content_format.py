"""Content-part lists become one string for a chat template that does not iterate over
content parts (vLLM's content format ``auto``); templates that do get the parts."""

from __future__ import annotations

import copy

from engine.tiny_model import CHAT_TEMPLATE
from vl.chat_messages import Chat, ImagePart, Message, TextPart
from vl.content_format import IMAGE_PLACEHOLDER, flatten_content, template_takes_parts
from vl.media_policy import MediaPolicy
from vl.prep_tools import PrepTools

STRING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_templates_that_iterate_over_content_take_parts():
    assert template_takes_parts(CHAT_TEMPLATE)
    assert template_takes_parts("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}")
    assert template_takes_parts(
        "{% for m in messages %}{% set content = m['content'] %}{% for p in content %}x{% endfor %}{% endfor %}"
    )
    assert not template_takes_parts(STRING_TEMPLATE)


def test_flattening_joins_parts_in_order_with_image_placeholders():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "plain"},
    ]
    assert flatten_content(messages) == [
        {"role": "user", "content": f"a\n{IMAGE_PLACEHOLDER}\nb"},
        {"role": "assistant", "content": "plain"},
    ]


def test_a_string_template_renders_the_text_of_every_part(tiny_model):
    """With the tiny tokenizer given a string-only template: parts arrive as text (never
    as a list's repr), one image placeholder per image, in several turns."""
    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    tokenizer.chat_template = STRING_TEMPLATE
    tools = PrepTools(tokenizer, MediaPolicy())
    chat = Chat(
        (
            Message("user", (TextPart("hello"), ImagePart("data:x"), TextPart("world"))),
            Message("assistant", "ok"),
            Message("user", (ImagePart("data:y"),)),
        )
    )
    ids = tools.render_and_tokenize(chat.template_messages())
    text = tokenizer.decode(ids)
    assert "hello\n" + IMAGE_PLACEHOLDER + "\nworld" in text
    assert "'type'" not in text and "[{" not in text
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 2
    # the tiny model's own template iterates over parts: the same chat, the same two images
    parts = PrepTools(tiny_model.tokenizer, MediaPolicy()).render_and_tokenize(chat.template_messages())
    assert parts.count(pad) == 2
