"""Engine logprobs in the two OpenAI shapes: chat (``content`` list) and legacy completions.

The ``*_payload`` functions build the JSON-ready dicts that streamed chunks carry; the
model functions validate the same dicts into the response schemas, so both paths share
one shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from engine.outputs import TokenLogprob
from server.schemas.chat import ChatLogprobs
from server.schemas.completions import CompletionLogprobs

FLOOR = -9999.0  # what OpenAI sends for probabilities that underflow; JSON has no -inf


def finite(logprob: float) -> float:
    """``logprob`` clamped to ``FLOOR`` (also for NaN), so it is valid JSON."""
    if math.isnan(logprob) or logprob < FLOOR:
        return FLOOR
    return logprob


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs_payload(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``ChatLogprobs`` as a dict, in the schema's field order."""
    return {
        "content": [
            {
                "token": item.token,
                "logprob": finite(item.logprob),
                "bytes": _token_bytes(item.token),
                "top_logprobs": [
                    {
                        "token": top.token,
                        "logprob": finite(top.logprob),
                        "bytes": _token_bytes(top.token),
                    }
                    for top in item.top
                ],
            }
            for item in items
        ],
        "refusal": None,
    }


def chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs.model_validate(chat_logprobs_payload(items))


def completion_logprobs_payload(items: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """``CompletionLogprobs`` as a dict; ``text_offset`` of the first token within the
    choice's text."""
    offsets = []
    for item in items:
        offsets.append(text_offset)
        text_offset += len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [finite(item.logprob) for item in items],
        "top_logprobs": [{top.token: finite(top.logprob) for top in item.top} for item in items],
        "text_offset": offsets,
    }


def completion_logprobs(items: Sequence[TokenLogprob], text_offset: int = 0) -> CompletionLogprobs:
    """Legacy shape; ``text_offset`` of the first token within the choice's text."""
    return CompletionLogprobs.model_validate(completion_logprobs_payload(items, text_offset))
