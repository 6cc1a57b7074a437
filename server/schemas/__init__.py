"""Pydantic v2 models of the OpenAI (and vLLM tokenizer) request and response shapes."""

from server.schemas.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatMessageOut,
    ChatTopLogprob,
    ContentPart,
    ImageURL,
)
from server.schemas.common import ErrorDetail, ErrorResponse, StreamOptions, Usage
from server.schemas.completions import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
)
from server.schemas.models import ModelCard, ModelList
from server.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatLogprobs",
    "ChatLogprobToken",
    "ChatMessage",
    "ChatMessageOut",
    "ChatTopLogprob",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "ContentPart",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "ErrorDetail",
    "ErrorResponse",
    "ImageURL",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeResponse",
    "Usage",
]
