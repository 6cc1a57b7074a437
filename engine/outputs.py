"""What the engine streams back to a request: detokenized deltas with ids and logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's logprob (from the model's raw distribution) and its top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class StreamDelta:
    """New output since the previous delta of the same request.

    ``text`` never contains a stop string, nor a prefix of one that may still complete.
    ``finish_reason`` is set on the last delta only: ``"stop"``, ``"length"`` or ``"abort"``.
    ``first_token_time``: ``time.perf_counter()`` when the sequence's first token reached
    the front end (``None`` before that): a final-only stream's one delta still tells when
    generation started (``server.request_metrics``).
    """

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    first_token_time: float | None = None
