"""What the engine receives for one sequence: token ids plus its images, either as pixels
for the engine's vision encoder to encode or as features encoded already."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light: the scheduler and the wire format import this module
    import torch

    from engine.pixel_slots import SlotPixels


@dataclass(frozen=True)
class ImageFeatures:
    """One image's vision-encoder output, ready to be scattered into the prompt embeddings.

    ``embeddings`` has one row per image placeholder token (after spatial merging);
    ``grid_thw`` is the (t, h, w) patch grid before merging, used for M-RoPE positions.
    """

    embeddings: torch.Tensor
    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class ImageInput:
    """One image for the engine's vision encoder (``engine.image_encoder``): its pixel
    patches, written by a prep worker into a shared-memory slot (``engine.pixel_slots``),
    its patch grid, and ``key``, which names the image's content and preprocessing (equal
    keys, equal features: the encoder encodes a key once and caches its features).

    The slot belongs to the front end; the engine's encoder reads the pixels in place and,
    once the image is encoded (or dropped), reports the sequence
    (``StepOutputs.pixels_read``) so the slot is reused."""

    key: str
    grid_thw: tuple[int, int, int]
    pixels: SlotPixels

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


@dataclass(frozen=True)
class EnginePrompt:
    """A tokenized prompt. ``images`` are in the order their placeholder runs appear: pixels
    for the engine to encode (``ImageInput``, what the server sends) or features encoded
    already (``ImageFeatures``, e.g. by a caller holding the model)."""

    token_ids: list[int]
    images: list[ImageFeatures | ImageInput] = field(default_factory=list)

    @property
    def has_pixels(self) -> bool:
        """True if any image is still pixels (the engine must encode it)."""
        return any(isinstance(image, ImageInput) for image in self.images)
