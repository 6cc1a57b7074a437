"""Whether a chat template takes content as a list of parts, and the string form of a
chat for a template that does not.

OpenAI content is a string or a list of parts (text, image). A template written for
string content (most text-only models', and some VLMs') renders a list as its Python
repr. As vLLM does (its ``--chat-template-content-format auto``), the template's source is
inspected: if no ``for`` loop iterates over a message's ``content``, each part list is
flattened to one string, parts joined by a newline, an image becoming
``IMAGE_PLACEHOLDER`` (the Qwen2-VL family's image text, which the preparer expands into
the image's tokens).
"""

from __future__ import annotations

import re
from typing import Any

import jinja2
from jinja2 import nodes

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PART_SEPARATOR = "\n"
_CONTENT_LOOP = re.compile(r"\{%-?\s*for\s+[\w\s,]+\s+in\s+[^%]*content")


def template_takes_parts(chat_template: str) -> bool:
    """Whether the template iterates over a message's ``content`` (``message['content']``,
    ``message.content``, or a variable named ``content``); a template Jinja cannot parse
    is judged by its text."""
    try:
        tree = jinja2.Environment().parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return bool(_CONTENT_LOOP.search(chat_template))
    return any(_names_content(loop.iter) for loop in tree.find_all(nodes.For))


def _names_content(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Getitem):
        return (isinstance(node.arg, nodes.Const) and node.arg.value == "content") or _names_content(node.node)
    if isinstance(node, nodes.Getattr):
        return node.attr == "content" or _names_content(node.node)
    if isinstance(node, nodes.Name):
        return "content" in node.name
    if isinstance(node, nodes.Filter):
        return node.node is not None and _names_content(node.node)
    return False


def flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` (template form) with every part list as one string (see the module)."""
    return [_flat(message) for message in messages]


def _flat(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    text = PART_SEPARATOR.join(
        part.get("text", "") if part.get("type") == "text" else IMAGE_PLACEHOLDER for part in content
    )
    return {**message, "content": text}
