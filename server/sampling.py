"""Map the sampling fields of a request to one ``SamplingParams`` per choice."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from server.errors import completion_too_long, empty_prompt, prompt_too_long
from server.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from server.schemas.common import SamplingRequest


@dataclass(frozen=True)
class LengthBudget:
    """How many tokens one prompt may still generate.

    ``requested`` is what the client asked for (``None``: not given) and ``field`` the
    request field it came from; ``default`` caps an absent request (``None``: no cap
    but the context).
    """

    prompt_tokens: int
    max_model_len: int
    requested: int | None
    field: str
    default: int | None
    prompt_param: str

    def max_tokens(self) -> int:
        """The completion length to use; raises ``InvalidRequest`` if it cannot fit."""
        room = self.max_model_len - self.prompt_tokens
        if self.prompt_tokens == 0:
            raise empty_prompt(self.prompt_param)
        if room < 1:
            raise prompt_too_long(self.max_model_len, self.prompt_tokens, self.prompt_param)
        if self.requested is None:
            return room if self.default is None else min(self.default, room)
        if self.requested > room:
            raise completion_too_long(self.max_model_len, self.prompt_tokens, self.requested, self.field)
        return self.requested


NEUTRAL = SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


def _first(*values: float | None) -> float:
    return next(value for value in values if value is not None)


def sampling_params(
    request: SamplingRequest,
    *,
    max_tokens: int,
    logprobs: int | None,
    defaults: SamplingDefaults = NO_DEFAULTS,
) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice (``n``); choice ``i`` gets ``seed + i``.

    A field the request leaves unset takes the model's default (``defaults``, from its
    ``generation_config.json``), else the neutral value (``NEUTRAL``).
    Raises ``InvalidRequest`` naming the parameter for values the sampler rejects.
    """
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    chosen = {name: _first(getattr(request, name), getattr(defaults, name), getattr(NEUTRAL, name)) for name in fields}
    base = {
        "max_tokens": max_tokens,
        **chosen,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "stop": request.stop_strings,
        "ignore_eos": request.ignore_eos,
        "logprobs": logprobs,
        "min_tokens": min(request.min_tokens, max_tokens),
        "stop_token_ids": tuple(request.stop_token_ids or ()),
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "logit_bias": request.token_biases,
    }
    return [SamplingParams(**base, seed=None if request.seed is None else request.seed + i) for i in range(request.n)]
