"""The typed chat the preparer consumes: messages of text and image parts, already valid.

The HTTP layer validates a request's ``messages`` once (``server.schemas.chat``) and
builds a ``Chat`` from them; nothing here validates its input again. Roles are those a
chat template knows (OpenAI's ``developer`` arrives as ``system``). Position in the chat
is the request's position, so ``Chat.images()`` can name each image's request field
(``messages[2].content[1].image_url``) in the errors it causes. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
Detail = Literal["auto", "low", "high"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image by URL (``data:``, ``http(s):`` or ``file:``); ``detail`` is accepted, unused."""

    url: str
    detail: Detail = "auto"


ContentPart = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    """One message: plain text, or parts in order."""

    role: Role
    content: str | tuple[ContentPart, ...]


@dataclass(frozen=True)
class ImageRef:
    """An image of a chat and the request field that names it."""

    image: ImagePart
    param: str


@dataclass(frozen=True)
class Chat:
    """The messages of one chat request, in request order."""

    messages: tuple[Message, ...]

    def images(self) -> list[ImageRef]:
        """Every image part in order, each with its request field."""
        return [
            ImageRef(part, f"messages[{i}].content[{j}].image_url")
            for i, message in enumerate(self.messages)
            if not isinstance(message.content, str)
            for j, part in enumerate(message.content)
            if isinstance(part, ImagePart)
        ]

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages in the form chat templates take: images become ``{"type": "image"}``
        parts in place (the preparer expands each into its feature tokens), so no image
        data travels to the tokenizer."""
        return [{"role": m.role, "content": _template_content(m.content)} for m in self.messages]


def _template_content(content: str | tuple[ContentPart, ...]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in content]
