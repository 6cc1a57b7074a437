"""Validation errors name the parameter the way OpenAI does."""

from __future__ import annotations

from server.request_body import param_path


def test_union_tags_are_dropped():
    data = {"messages": [{"content": [{"type": "text"}, {"type": "image_url", "image_url": {}}]}]}
    loc = ("messages", 0, "content", "list[ContentPart]", 1, "image_url", "url")
    assert param_path(loc, data, "missing") == "messages[0].content[1].image_url.url"
    assert param_path(("messages", 0, "content", "str"), data, "string_type") == "messages[0].content"


def test_missing_top_level_field():
    assert param_path(("messages",), {}, "missing") == "messages"
    assert param_path((), {}, "model_type") is None
