"""The content key of an image: what the engine's feature cache is keyed by (equal keys,
equal features)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vl.image_source import EncodedImage


def image_cache_key(image: EncodedImage, settings_key: str) -> str:
    """The key of an image: its bytes, their encoding and the preprocessor settings.
    Hashing releases the GIL for payloads of more than 2 KiB."""
    return f"{hashlib.sha256(image.payload).hexdigest()}:{int(image.base64_encoded)}:{settings_key}"
