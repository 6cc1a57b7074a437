"""``POST /v1/chat/completions``: request, response and streaming chunk shapes.

The request's ``messages`` are validated here and nowhere else: ``ChatCompletionRequest.chat()``
turns them into the typed ``vl.chat_messages.Chat`` the preparer consumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from server.schemas.common import (
    RequestModel,
    SamplingRequest,
    Usage,
    UsageOnlyIfSet,
    reject_unsupported,
)
from vl.chat_messages import Chat, ImagePart, Message, TextPart
from vl.errors import InvalidRequest

# OpenAI chat fields we do not implement, with the values that ask for nothing.
UNSUPPORTED_CHAT: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        "tools": ([],),
        "tool_choice": ("none",),
        "parallel_tool_calls": (True, False),
        "functions": ([],),
        "function_call": ("none",),
        "response_format": ({"type": "text"},),
        "audio": (),
        "modalities": (["text"],),
        "prediction": (),
        "reasoning_effort": (),
        "web_search_options": (),
        "verbosity": (),
        "store": (False,),
    }
)


# Message fields OpenAI defines for an assistant message that we do not implement, with the
# values that ask for nothing. ``refusal`` is accepted (unused), as ``name`` is: clients send
# back the assistant messages they were given, and ours carry ``"refusal": null``.
UNSUPPORTED_MESSAGE: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {"tool_calls": ([],), "function_call": (), "audio": ()}
)
ASSISTANT_ONLY = ("refusal", *UNSUPPORTED_MESSAGE)


class ImageURL(RequestModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(RequestModel):
    """One part of a message's content: ``text`` or ``image_url``."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _payload_matches_type(self) -> ContentPart:
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise PydanticCustomError("content_part", "a 'text' part has exactly a 'text' field")
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise PydanticCustomError("content_part", "an 'image_url' part has exactly an 'image_url' field")
        return self

    def to_part(self) -> TextPart | ImagePart:
        if self.image_url is None:
            return TextPart(self.text or "")
        return ImagePart(self.image_url.url, self.image_url.detail or "auto")


class ChatMessage(RequestModel):
    """A message with role system/developer/user/assistant; ``name`` is accepted, unused.

    ``content`` is required, except on an assistant message, where it may be ``null`` or
    absent (OpenAI allows that; the message then has empty content). ``tool_calls``,
    ``function_call`` and ``audio`` are accepted on an assistant message only with values
    that ask for nothing (absent, ``null``; ``[]`` for ``tool_calls``), since this server
    has no tools.
    """

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    refusal: str | None = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise PydanticCustomError("missing", "Field required")
        return value

    @field_validator(*ASSISTANT_ONLY, mode="before")
    @classmethod
    def _assistant_fields(cls, value: Any, info: ValidationInfo) -> Any:
        field = info.field_name
        if value is not None and info.data.get("role", "assistant") != "assistant":
            raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")
        if field in UNSUPPORTED_MESSAGE:
            return reject_unsupported(value, field, UNSUPPORTED_MESSAGE[field])
        return value

    def to_message(self) -> Message:
        """The typed message (``developer`` becomes ``system``; no content becomes ``""``)."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return Message(role, self.content or "")
        return Message(role, tuple(part.to_part() for part in self.content))


def chat_of(messages: list[ChatMessage]) -> Chat:
    """The typed chat of validated messages, in request order."""
    return Chat(tuple(message.to_message() for message in messages))


class ChatMessages(RequestModel):
    """Just the messages of a chat (``server.request_body.parse_chat``)."""

    messages: list[ChatMessage] = Field(min_length=1)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    store: Any = None

    @field_validator(*UNSUPPORTED_CHAT, mode="before")
    @classmethod
    def _unsupported_chat(cls, value: Any, info: ValidationInfo) -> Any:
        return reject_unsupported(value, info.field_name, UNSUPPORTED_CHAT[info.field_name])

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The asked-for completion length and the field it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def sampler_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: None, or the number of top alternatives."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def chat(self) -> Chat:
        """The typed chat of ``messages``."""
        return chat_of(self.messages)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobToken(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None
    refusal: list[ChatLogprobToken] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """A chunk's delta; fields left ``None`` are omitted, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _omit_none(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(UsageOnlyIfSet):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
