"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from server.schemas.chat import ChatMessage, MmProcessorKwargs, chat_of
from server.schemas.common import RequestModel, reject_unsupported
from vl.chat_messages import Chat

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestModel):
    """Tokenize a chat as the chat endpoint would (with the generation prompt)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    mm_processor_kwargs: MmProcessorKwargs | None = None

    @field_validator("add_generation_prompt", mode="before")
    @classmethod
    def _generation_prompt_only(cls, value: Any, info: ValidationInfo) -> Any:
        return reject_unsupported(value, f"{info.field_name}=false", (True,))

    def chat(self) -> Chat:
        """The typed chat of ``messages`` (and the images' pixel request)."""
        return chat_of(self.messages, mm_processor_kwargs=self.mm_processor_kwargs)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str
