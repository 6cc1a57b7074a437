"""Image preprocessing: a decoded PIL image into the vision tower's pixel patches.

Wraps the model's own Hugging Face image processor (loaded with ``AutoImageProcessor``, so
no torchvision is needed). Synchronous; runs in a worker thread under the CPU-prep gate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class PixelInputs:
    """One image's patches: ``pixel_values`` [patches, channels*t*p*p], grid (t, h, w)."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


class ImagePreprocessor:
    def __init__(self, image_processor: Any, merge_size: int) -> None:
        self._processor = image_processor
        self.merge_size = merge_size
        self.settings_key = _settings_key(image_processor)

    def __call__(self, image: Image.Image) -> PixelInputs:
        out = self._processor(images=[image], return_tensors="pt")
        grid = tuple(int(x) for x in out["image_grid_thw"][0].tolist())
        return PixelInputs(pixel_values=out["pixel_values"], grid_thw=grid)


def _settings_key(processor: Any) -> str:
    """A short digest of the processor settings that change its output (cache key part)."""
    try:
        settings = processor.to_dict()
    except Exception:  # processors without to_dict: fall back to their repr
        settings = {"repr": repr(processor)}
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
