"""Shapes shared by several endpoints: request base, sampling fields, usage.

Error bodies are built by ``server.errors``, not modelled here."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from vl.errors import InvalidRequest

MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_TOKEN_ID_DIGITS = 20  # a 64-bit id; longer decimal strings are no token id (and int() refuses huge ones)


class RequestModel(BaseModel):
    """Base of every request body: unknown fields are an error, not silence."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(RequestModel):
    include_usage: bool = False


def _acceptable(value: Any, *harmless: Any) -> bool:
    return value is None or value in harmless


def reject_unsupported(value: Any, field: str, harmless: tuple[Any, ...]) -> Any:
    """Return ``value`` if it asks for nothing we lack; else raise a pydantic error."""
    if _acceptable(value, *harmless):
        return value
    raise PydanticCustomError(
        "unsupported_parameter",
        "'{field}' is not supported by this server.",
        {"field": field},
    )


class SamplingRequest(RequestModel):
    """Fields common to chat and text completions, mapped to ``SamplingParams``."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM names)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS
    )
    # accepted and ignored: they ask nothing of generation
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and not all(key.isdecimal() and len(key) <= MAX_TOKEN_ID_DIGITS for key in value):
            raise PydanticCustomError("logit_bias", "keys must be token ids (decimal strings)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list_bounded(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise PydanticCustomError(
                "too_many_stop_strings", "at most {limit} stop strings", {"limit": MAX_STOP_STRINGS}
            )
        return value

    def check_combinations(self) -> None:
        """Raise ``InvalidRequest`` for fields that are valid alone but not together."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")

    @property
    def token_biases(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs."""
        return tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items())

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageOnlyIfSet(BaseModel):
    """A chunk: ``usage`` is sent (possibly ``null``) only if it was set explicitly.

    OpenAI sends ``"usage": null`` on every chunk when ``include_usage`` is on, and no
    ``usage`` key at all otherwise.
    """

    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _usage_only_if_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        usage = data.pop("usage", None)
        if "usage" in self.model_fields_set:
            data["usage"] = usage
        return data
