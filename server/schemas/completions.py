"""``POST /v1/completions``: request, response and streaming chunk shapes."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from server.schemas.common import (
    SamplingRequest,
    Usage,
    UsageOnlyIfSet,
    reject_unsupported,
)
from vl.errors import InvalidRequest

MAX_PROMPTS = 64
DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for legacy completions

UNSUPPORTED_COMPLETIONS: Mapping[str, tuple[Any, ...]] = MappingProxyType(
    {
        "best_of": (1,),
        "suffix": ("",),
    }
)


TokenIds = list[Annotated[int, Field(ge=0)]]
Prompt = str | TokenIds


class CompletionRequest(SamplingRequest):
    """``prompt``: a string, a list of strings, token ids, or a list of token-id lists
    (as OpenAI and vLLM take them)."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field()
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: Any = None
    suffix: Any = None

    @field_validator(*UNSUPPORTED_COMPLETIONS, mode="before")
    @classmethod
    def _unsupported_completions(cls, value: Any, info: ValidationInfo) -> Any:
        field = info.field_name
        return reject_unsupported(value, field, UNSUPPORTED_COMPLETIONS[field])

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, value: Any) -> Any:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise PydanticCustomError("prompt_count", "must hold 1 to {limit} prompts", {"limit": MAX_PROMPTS})
        return value

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("'echo' together with 'logprobs' is not supported by this server.", param="echo")

    @property
    def prompts(self) -> list[Prompt]:
        """Each prompt: a string or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def prompt_params(self) -> list[str]:
        """The request field of each prompt: ``prompt`` alone, or ``prompt[i]`` in a list."""
        prompts = self.prompts
        if len(prompts) == 1 and prompts[0] is self.prompt:
            return ["prompt"]
        return [f"prompt[{i}]" for i in range(len(prompts))]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    system_fingerprint: str | None = None


class CompletionChunk(UsageOnlyIfSet):
    """Streamed completions use the same object type as whole ones, one delta per choice."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
