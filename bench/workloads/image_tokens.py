"""The image-token setting of a benchmark run: the tiny model's 256-token cap, or real
Qwen2-VL image sizes.

``256`` (the default): every server serves the tiny model as built by default, whose image
processor resizes an image to at most 256 image tokens. ``real``: every server serves the
same tiny model built with the image limits real Qwen2-VL checkpoints ship
(``engine.tiny_model.QWEN2_VL_DEFAULT_IMAGE_LIMITS``: max_pixels 12,845,056), so a 1024²
photo becomes 1,369 image tokens and 5,476 vision patches, which is where real deployments
spend their time. The counts come from the image processor's own resize rule (Qwen2-VL's
``smart_resize``); ``tests/engine/test_tiny_model.py`` checks them against the processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN_SETTINGS = ("256", "real")
_MIB = 1 << 20
_PATCH = 14  # the tiny model's vision patch side, as in Qwen2-VL
_MERGE = 2  # 2x2 patches merge into one image token
_VALUES_PER_PATCH = 3 * _PATCH * _PATCH  # RGB x 14 x 14: vlserve stores each patch's frame once
_VALUE_BYTES = 4  # float32 pixel values


@dataclass(frozen=True)
class ImageTokenSetting:
    """One of ``IMAGE_TOKEN_SETTINGS``; what it means for the model and for a square image."""

    name: str = "256"

    def __post_init__(self) -> None:
        if self.name not in IMAGE_TOKEN_SETTINGS:
            raise ValueError(
                f"unknown image-token setting {self.name!r}; choose from {', '.join(IMAGE_TOKEN_SETTINGS)}"
            )

    @property
    def limits(self):
        """The tiny model's ``engine.tiny_model.ImageLimits`` for this setting."""
        from engine.tiny_model import QWEN2_VL_DEFAULT_IMAGE_LIMITS, TINY_IMAGE_LIMITS

        return QWEN2_VL_DEFAULT_IMAGE_LIMITS if self.name == "real" else TINY_IMAGE_LIMITS

    def patches(self, size: int) -> int:
        """Vision patches of a ``size``² image (the processor's resize, then 14x14 patches)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        limits = self.limits
        height, width = smart_resize(
            size, size, factor=_PATCH * _MERGE, min_pixels=limits.min_pixels, max_pixels=limits.max_pixels
        )
        return (height // _PATCH) * (width // _PATCH)

    def image_tokens(self, size: int) -> int:
        """Image tokens of a ``size``² image in the prompt (one per 2x2 merged patches)."""
        return self.patches(size) // (_MERGE * _MERGE)

    def pixel_slot_mb(self, size: int) -> int | None:
        """vlserve's ``--pixel-slot-mb`` for images of at most ``size``² pixels: the smallest
        power of two MiB that holds their float32 pixel values, one frame per patch as vlserve
        stores them (1024²: 12.3 MiB, so 16), or
        ``None`` for ``256``, where vlserve's own sizing (from max_pixels, 5 MiB) is small."""
        if self.name != "real":
            return None
        needed = self.patches(size) * _VALUES_PER_PATCH * _VALUE_BYTES
        return 1 << max(0, math.ceil(math.log2(needed / _MIB)))

    def ensure_model(self) -> Path:
        """The tiny model directory for this setting, built once into the user cache.
        Blocking (≈10 s the first time): call it from a worker thread under an event loop."""
        from engine.tiny_model import ensure_tiny_model

        return ensure_tiny_model(image_limits=self.limits)

    def describe(self, size: int) -> str:
        """One line for the result tables: the setting and what it makes of a ``size``² image."""
        limits = self.limits
        head = "real Qwen2-VL image sizes" if self.name == "real" else "the tiny model's 256-token cap"
        slots = self.pixel_slot_mb(size)
        return (
            f"image tokens: {self.name} ({head}: max_pixels {limits.max_pixels:,}); a {size}² image is "
            f"{self.image_tokens(size):,} image tokens, {self.patches(size):,} vision patches"
            + (f"; vlserve --pixel-slot-mb {slots}" if slots else "")
        )

    def as_dict(self, size: int) -> dict:
        """The setting for the results JSON."""
        return {
            "name": self.name,
            "min_pixels": self.limits.min_pixels,
            "max_pixels": self.limits.max_pixels,
            "image_size": size,
            "image_tokens_per_image": self.image_tokens(size),
            "vision_patches_per_image": self.patches(size),
            "vlserve_pixel_slot_mb": self.pixel_slot_mb(size),
        }
