"""How many pixels an image is resized to before the vision tower: the server's bounds,
narrowed per image by its ``detail`` and the request's ``mm_processor_kwargs``.

A Qwen2-VL-style image processor resizes every image so that its pixel count lies
between ``min_pixels`` and ``max_pixels``; each ``token_pixels`` (``(patch_size x
merge_size)²``, 784 for Qwen2-VL) of the result is one image token. The rules, in one place:

- the server's bounds are the image processor's own, replaced by ``--min-pixels`` /
  ``--max-pixels`` when set; without ``--max-pixels`` an image may fill at most half the
  context (``CONTEXT_SHARE``), so a 12-megapixel photo cannot overflow it by itself;
- ``mm_processor_kwargs`` (``min_pixels`` / ``max_pixels``) narrow them per request,
  clamped to the server's bounds (so no request can ask for more than the slots hold);
- ``detail: "low"`` caps an image at ``LOW_DETAIL_TOKENS`` tokens (OpenAI's low detail is a
  fixed small budget too); ``auto`` and ``high`` use the bounds as they are.

Pure arithmetic on frozen values: no I/O, importable anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOW_DETAIL_TOKENS = 64
CONTEXT_SHARE = 2  # by default one image takes at most 1/CONTEXT_SHARE of the context


@dataclass(frozen=True)
class PixelBounds:
    """An image is resized to between ``min_pixels`` and ``max_pixels`` pixels."""

    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def key(self) -> str:
        """A short text for cache keys: equal keys, equal resizing."""
        return f"{self.min_pixels}-{self.max_pixels}"


@dataclass(frozen=True)
class PixelRequest:
    """What a request asks in ``mm_processor_kwargs`` (``None``: not asked)."""

    min_pixels: int | None = None
    max_pixels: int | None = None


def processor_bounds(image_processor: Any) -> PixelBounds | None:
    """The processor's own bounds (``min_pixels``/``max_pixels``, or ``size``'s
    ``shortest_edge``/``longest_edge`` in recent transformers); ``None`` if it has none."""
    size = getattr(image_processor, "size", None)

    def setting(name: str, size_name: str) -> Any:
        value = getattr(image_processor, name, None)
        if value is None and size is not None:
            value = size.get(size_name) if isinstance(size, dict) else getattr(size, size_name, None)
        return value

    low, high = setting("min_pixels", "shortest_edge"), setting("max_pixels", "longest_edge")
    if not (low and high):
        return None
    return PixelBounds(int(low), int(high))


def server_bounds(
    model: PixelBounds,
    *,
    token_pixels: int,
    max_model_len: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> PixelBounds:
    """The server's bounds: the model's, with ``min_pixels``/``max_pixels`` (the server
    flags) in their place when set; without ``max_pixels``, at most ``1/CONTEXT_SHARE`` of
    ``max_model_len`` in tokens. Raises ``ValueError`` if the flags contradict each other."""
    high = max_pixels or min(model.max_pixels, max(1, max_model_len // CONTEXT_SHARE) * token_pixels)
    low = min_pixels or min(model.min_pixels, high)
    if low > high:
        raise ValueError(f"--min-pixels {low} is above --max-pixels {high}")
    return PixelBounds(low, high)


def image_bounds(server: PixelBounds, *, detail: str, request: PixelRequest | None, token_pixels: int) -> PixelBounds:
    """One image's bounds (see the module's rules); always within ``server``."""

    def clamp(value: int | None, default: int) -> int:
        return default if value is None else max(server.min_pixels, min(server.max_pixels, value))

    high = clamp(request.max_pixels if request else None, server.max_pixels)
    if detail == "low":
        high = min(high, LOW_DETAIL_TOKENS * token_pixels)
    low = min(clamp(request.min_pixels if request else None, server.min_pixels), high)
    return PixelBounds(max(1, low), max(1, high))
