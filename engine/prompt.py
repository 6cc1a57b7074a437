"""What the engine receives for one sequence: token ids plus precomputed image features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light: the scheduler and the wire format import this module
    import torch


@dataclass(frozen=True)
class ImageFeatures:
    """One image's vision-encoder output, ready to be scattered into the prompt embeddings.

    ``embeddings`` has one row per image placeholder token (after spatial merging);
    ``grid_thw`` is the (t, h, w) patch grid before merging, used for M-RoPE positions.
    """

    embeddings: torch.Tensor
    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class EnginePrompt:
    """A tokenized prompt. ``images`` are in the order their placeholder runs appear."""

    token_ids: list[int]
    images: list[ImageFeatures] = field(default_factory=list)
