"""The typed chat: its images in order with their request fields, and its template form."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import vl
from engine.pixel_slots import SlotSpec
from vl.chat_messages import Chat, ImagePart, Message, TextPart
from vl.image_source import EncodedImage
from vl.prep_tools import ImagePixels, RenderChat

CHAT = Chat(
    (
        Message("system", "be brief"),
        Message(
            "user",
            (ImagePart("data:image/png;base64,AAAA"), TextPart("and"), ImagePart("https://x.example/b.png", "low")),
        ),
        Message("assistant", ""),
        Message("user", (TextPart("again"), ImagePart("file:///srv/c.png"))),
    )
)


def test_images_in_order_named_by_their_request_field():
    refs = CHAT.images()
    assert [ref.image.url for ref in refs] == [
        "data:image/png;base64,AAAA",
        "https://x.example/b.png",
        "file:///srv/c.png",
    ]
    assert [ref.param for ref in refs] == [
        "messages[1].content[0].image_url",
        "messages[1].content[2].image_url",
        "messages[3].content[1].image_url",
    ]


def test_template_messages_hold_placeholders_not_image_data():
    """The chat template gets one ``{"type": "image"}`` per image, in place, and no URL: the
    (possibly many-megabyte) image data never travels to the tokenizer or a prep process."""
    assert CHAT.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "again"}, {"type": "image"}]},
    ]
    assert "AAAA" not in repr(CHAT.template_messages())


def test_prep_steps_pickle_for_prep_processes():
    """Steps are values chosen by type; they travel to a prep process as they are."""
    steps = [
        RenderChat(CHAT.template_messages()),
        ImagePixels(EncodedImage(b"x", False, "data"), "messages[1].content[0].image_url", 3, SlotSpec("psm_x", 8, 1)),
    ]
    assert [pickle.loads(pickle.dumps(step)) for step in steps] == steps


def test_vl_errors_are_built_only_in_vl_errors():
    """Every ``InvalidRequest``/``MediaError``/``MediaTimeout`` in ``vl`` is constructed by a
    function of ``vl/errors.py``: no module assembles its own message and code."""
    error_classes = {"InvalidRequest", "MediaError", "MediaTimeout"}
    offenders = []
    for path in Path(vl.__file__).parent.glob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in error_classes:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
