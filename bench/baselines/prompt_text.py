"""Prompt work shared by both baselines: chat template, tokenization, image-token expansion.

Synchronous, GIL-holding Python (Jinja rendering, single-text tokenization): where it runs
(event loop or executor) is exactly what distinguishes the two layouts.
"""

from __future__ import annotations

from typing import Any

from vl.errors import InvalidRequest


def render_and_tokenize(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the chat template applied to ``messages``, one placeholder per image."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expand_image_tokens(token_ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """Repeat the ``k``-th image placeholder ``counts[k]`` times (one per feature row)."""
    positions = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(positions) != len(counts):
        raise InvalidRequest(
            f"The prompt has {len(positions)} image placeholders for {len(counts)} images.",
            param="messages",
            code="image_token_mismatch",
        )
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, counts, strict=True):
        out.extend(token_ids[start:pos])
        out.extend([image_token_id] * count)
        start = pos + 1
    out.extend(token_ids[start:])
    return out
