"""The typed chat the preparer consumes: messages of text and image parts, already valid.

The HTTP layer validates a request's ``messages`` once (``server.schemas.chat``) and
builds a ``Chat`` from them; nothing here validates its input again. Roles are those a
chat template knows (OpenAI's ``developer`` arrives as ``system``; ``tool`` carries a tool's
result). A chat may carry ``tools`` (OpenAI function definitions) for the template's
``tools`` variable. Position in the chat
is the request's position, so ``Chat.images()`` can name each image's request field
(``messages[2].content[1].image_url``) in the errors it causes. Pure data: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from vl.pixel_budget import PixelRequest

Role = Literal["system", "user", "assistant", "tool"]
Detail = Literal["auto", "low", "high"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image by URL (``data:``, ``http(s):`` or ``file:``); ``detail`` chooses its pixel
    budget (``vl.pixel_budget``: ``low`` is a small fixed one)."""

    url: str
    detail: Detail = "auto"


ContentPart = TextPart | ImagePart


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant message made: ``arguments`` is the JSON text OpenAI carries."""

    id: str
    name: str
    arguments: str

    def template_form(self) -> dict[str, Any]:
        """The call as Hugging Face chat templates take it: ``arguments`` as an object when
        the text is a JSON object (Qwen's templates ``tojson`` it), else the text."""
        try:
            arguments: Any = json.loads(self.arguments)
        except ValueError:
            arguments = self.arguments
        if not isinstance(arguments, dict):
            arguments = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


@dataclass(frozen=True)
class Message:
    """One message: plain text, or parts in order. An assistant message may carry
    ``tool_calls``; a ``tool`` message names the call it answers in ``tool_call_id``."""

    role: Role
    content: str | tuple[ContentPart, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def template_form(self) -> dict[str, Any]:
        form: dict[str, Any] = {"role": self.role, "content": _template_content(self.content)}
        if self.tool_calls:
            form["tool_calls"] = [call.template_form() for call in self.tool_calls]
        if self.tool_call_id is not None:
            form["tool_call_id"] = self.tool_call_id
        return form


class TemplateMessages(list):
    """Messages in the form chat templates take, and ``tools``: the function definitions
    for the template's ``tools`` variable (``None``: no tools). A list, so a step that
    takes messages takes these unchanged; the tools travel with them (they pickle)."""

    def __init__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools

    def __reduce__(self) -> tuple[Any, ...]:
        return (TemplateMessages, (list(self), self.tools))


@dataclass(frozen=True)
class ImageRef:
    """An image of a chat and the request field that names it."""

    image: ImagePart
    param: str


@dataclass(frozen=True)
class Chat:
    """The messages of one chat request, in request order; ``pixels``: what the request
    asks of its images' pixel budget (``mm_processor_kwargs``; ``None``: nothing)."""

    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] = ()
    pixels: PixelRequest | None = None

    def images(self) -> list[ImageRef]:
        """Every image part in order, each with its request field."""
        return [
            ImageRef(part, f"messages[{i}].content[{j}].image_url")
            for i, message in enumerate(self.messages)
            if not isinstance(message.content, str)
            for j, part in enumerate(message.content)
            if isinstance(part, ImagePart)
        ]

    def template_messages(self) -> TemplateMessages:
        """The messages in the form chat templates take: images become ``{"type": "image"}``
        parts in place (the preparer expands each into its feature tokens), so no image
        data travels to the tokenizer; tool calls and tool results in Hugging Face's form;
        the chat's tools beside them (``TemplateMessages.tools``)."""
        return TemplateMessages([m.template_form() for m in self.messages], list(self.tools) or None)


def _template_content(content: str | tuple[ContentPart, ...]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in content]
