"""``POST /v1/chat/completions``: request, response and streaming chunk shapes.

The request's ``messages`` are validated here and nowhere else: ``ChatCompletionRequest.chat()``
turns them into the typed ``vl.chat_messages.Chat`` the preparer consumes. ``tools``,
``tool_choice``, ``parallel_tool_calls`` and ``response_format`` are validated here too;
``server.structured_output`` turns them into a grammar, ``server.tool_calls`` parses calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
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
from vl.chat_messages import Chat, ImagePart, Message, TextPart, ToolCall
from vl.errors import InvalidRequest
from vl.pixel_budget import PixelRequest

# OpenAI chat fields we do not implement, with the values that ask for nothing.
UNSUPPORTED_CHAT: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        "functions": ([],),
        "function_call": ("none",),
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
UNSUPPORTED_MESSAGE: Mapping[str, tuple[Any, ...]] = MappingProxyType({"function_call": (), "audio": ()})
ASSISTANT_ONLY = ("refusal", "tool_calls", *UNSUPPORTED_MESSAGE)

FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCallIn(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str


class ToolCallIn(RequestModel):
    """A tool call an assistant message made, as the client sends it back."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' JSON schema (OpenAI: no ``parameters`` means no arguments)."""
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(RequestModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (output matches it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError(
                "response_format", "'json_schema' is required with type 'json_schema' and allowed only with it"
            )
        return self


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
    """A message with role system/developer/user/assistant/tool; ``name`` is accepted, unused.

    ``content`` is required, except on an assistant message, where it may be ``null`` or
    absent (OpenAI allows that; the message then has empty content). An assistant message
    may carry ``tool_calls``; a ``tool`` message must name the call it answers in
    ``tool_call_id``. ``function_call`` and ``audio`` (deprecated and audio features) are
    accepted on an assistant message only with values that ask for nothing.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)
    function_call: Any = None
    audio: Any = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise PydanticCustomError("missing", "Field required")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id_on_tool_messages(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if role == "tool" and not value:
            raise PydanticCustomError("missing", "Field required")
        if role is not None and role != "tool" and value is not None:
            raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")
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
        calls = tuple(call.to_call() for call in self.tool_calls or ())
        if self.content is None or isinstance(self.content, str):
            return Message(role, self.content or "", calls, self.tool_call_id)
        return Message(role, tuple(part.to_part() for part in self.content), calls, self.tool_call_id)


class MmProcessorKwargs(RequestModel):
    """vLLM's per-request image processor settings; only the pixel bounds are taken
    (clamped to the server's, ``vl.pixel_budget``)."""

    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)

    def to_request(self) -> PixelRequest:
        return PixelRequest(self.min_pixels, self.max_pixels)


def chat_of(
    messages: list[ChatMessage],
    tools: list[ToolDefinition] | None = None,
    mm_processor_kwargs: MmProcessorKwargs | None = None,
) -> Chat:
    """The typed chat of validated messages, in request order, with the tools and the
    images' pixel request."""
    tool_forms = tuple(tool.model_dump(exclude_none=True) for tool in tools or ())
    pixels = mm_processor_kwargs.to_request() if mm_processor_kwargs is not None else None
    return Chat(tuple(message.to_message() for message in messages), tool_forms, pixels)


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
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    mm_processor_kwargs: MmProcessorKwargs | None = None  # vLLM's extra field
    functions: Any = None
    function_call: Any = None
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
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and not self.tools:
            raise InvalidRequest("'tool_choice' requires 'tools' to name at least one function.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.named_tool is None:
            raise InvalidRequest(
                f"'tool_choice.function.name' names '{self.tool_choice.function.name}', which is not a function in 'tools'.",
                param="tool_choice.function.name",
            )
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(
                "'response_format' cannot be combined with a 'tool_choice' that forces a tool call.",
                param="response_format",
            )
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise InvalidRequest("'tools' names the same function twice.", param="tools")

    @property
    def named_tool(self) -> ToolDefinition | None:
        """The tool ``tool_choice`` names, if it names one that ``tools`` defines."""
        if not isinstance(self.tool_choice, NamedToolChoice):
            return None
        return next((t for t in self.tools or () if t.function.name == self.tool_choice.function.name), None)

    @property
    def effective_tool_choice(self) -> str:
        """``none``, ``auto``, ``required`` or ``named``: OpenAI's default is ``auto`` with
        tools and ``none`` without."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

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
        """The typed chat of ``messages``, ``tools`` and ``mm_processor_kwargs``."""
        return chat_of(self.messages, self.tools, self.mm_processor_kwargs)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobToken(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None
    refusal: list[ChatLogprobToken] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    """The assistant's message; ``tool_calls`` is sent only when there are some."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_only_if_any(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if not self.tool_calls:
            data.pop("tool_calls", None)
        return data


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
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer
    def _omit_none(self) -> dict[str, Any]:
        fields = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
        return {k: v for k, v in fields if v is not None}


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
