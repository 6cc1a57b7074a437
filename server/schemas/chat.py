"""``POST /v1/chat/completions``: request, response and streaming chunk shapes."""

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
            raise PydanticCustomError(
                "content_part", "an 'image_url' part has exactly an 'image_url' field"
            )
        return self


class ChatMessage(RequestModel):
    """A message with role system/developer/user/assistant; ``name`` is accepted, unused."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def to_prompt_dict(self) -> dict[str, Any]:
        """The OpenAI-shaped dict the chat preparer takes (``developer`` becomes ``system``)."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        return {"role": role, "content": [p.model_dump(exclude_none=True) for p in self.content]}


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
            raise InvalidRequest(
                "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs"
            )

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

    def prompt_messages(self) -> list[dict[str, Any]]:
        return [m.to_prompt_dict() for m in self.messages]


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
