"""Validate OpenAI chat messages and split them into template input and image references.

Pure functions: no I/O, no threads. Every rejection is an ``InvalidRequest`` naming the
exact request field (``messages[2].content[1].image_url.url``) that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vl.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "developer")
DETAILS = ("auto", "low", "high")


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str


@dataclass(frozen=True)
class ParsedChat:
    """``messages`` in the form chat templates expect (images as ``{"type": "image"}``
    parts, in order) and the images they reference, in the same order."""

    messages: list[dict]
    images: list[ImageRef]


def parse_messages(messages: Any, *, max_images: int, images_allowed: bool) -> ParsedChat:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list.", param="messages")
    out: list[dict] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object.", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"{where}.role must be one of {', '.join(ROLES)} (got {role!r}).", param=f"{where}.role"
            )
        for unsupported in ("tool_calls", "function_call", "audio"):
            if message.get(unsupported):
                raise InvalidRequest(f"{where}.{unsupported} is not supported.", param=f"{where}.{unsupported}")
        content = message.get("content")
        if isinstance(content, str):
            parts: str | list = content
        elif isinstance(content, list):
            parts = [_parse_part(part, f"{where}.content[{j}]", images) for j, part in enumerate(content)]
        elif content is None and role == "assistant":
            parts = ""
        else:
            raise InvalidRequest(f"{where}.content must be a string or a list of content parts.", param=f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": parts})
    if images and not images_allowed:
        raise InvalidRequest("This model does not accept images.", param=images[0].param, code="images_not_supported")
    if len(images) > max_images:
        raise InvalidRequest(
            f"At most {max_images} images are allowed per request (got {len(images)}).",
            param=images[max_images].param,
            code="too_many_images",
        )
    return ParsedChat(out, images)


def _parse_part(part: Any, where: str, images: list[ImageRef]) -> dict:
    if not isinstance(part, dict):
        raise InvalidRequest(f"{where} must be an object.", param=where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.text must be a string.", param=f"{where}.text")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image_url = part.get("image_url")
        if isinstance(image_url, str):
            url = image_url
        elif isinstance(image_url, dict):
            url = image_url.get("url")
            detail = image_url.get("detail", "auto")
            if detail not in DETAILS:
                raise InvalidRequest(
                    f"{where}.image_url.detail must be one of {', '.join(DETAILS)}.", param=f"{where}.image_url.detail"
                )
        else:
            url = None
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"{where}.image_url.url must be a non-empty string.", param=f"{where}.image_url.url")
        images.append(ImageRef(url, f"{where}.image_url"))
        return {"type": "image"}
    raise InvalidRequest(
        f"{where}.type {kind!r} is not supported (supported: text, image_url).", param=f"{where}.type"
    )
