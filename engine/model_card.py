"""What a process that serves a model without running it knows of the model: its
``ModelCard``. Light (no torch, no transformers), so the server's front end can hold one
without importing either (``server/front_card.py``); ``engine.model_loader`` reads it
(``load_model_card``) and extends it into the loaded model (``LoadedModel``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ModelCard:
    """The model's tokenizer, limits, stop ids and image settings, read from its directory
    without building the model.

    ``spatial_merge_size`` is the vision tower's (``None`` for a text model); the image
    processor is the ``vl`` layer's to load (``vl.image_pixels.load_image_preprocessor``).
    ``device`` and ``dtype`` are names (``"cpu"``, ``"cuda:0"``; ``"float32"``), resolved
    from the configured ones (``"auto"`` becomes a dtype); a ``LoadedModel`` holds torch's
    own objects there, whose ``str`` is the same device name."""

    path: Path
    tokenizer: Any
    supports_images: bool
    spatial_merge_size: int | None
    device: Any
    dtype: Any
    eos_token_ids: frozenset[int]
    max_model_len: int
    load_seconds: float

    @property
    def device_type(self) -> str:
        """``"cpu"`` or ``"cuda"``, without an index."""
        return str(self.device).split(":", 1)[0]

    @property
    def dtype_name(self) -> str:
        """``"float32"``, ``"bfloat16"``, ...: the dtype without torch's prefix."""
        return str(self.dtype).removeprefix("torch.")
