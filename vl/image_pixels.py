"""An encoded image to the vision tower's pixel patches: decode within the media policy
(``decode_image``), then preprocess with the model's image processor (``ImagePreprocessor``).
The patches stay in the process as ``PixelInputs`` or, written into a shared-memory pixel
slot (``engine.pixel_slots``), travel as a small ``SlotImage``; ``slot_bytes_for`` sizes the
slots from the image processor's largest output.

Synchronous CPU work, run by the ``ImagePixels`` prep step (``vl.prep_tools``) in a worker
thread or prep process under the image-prep gate.

Decoding touches no global state: PIL's ``MAX_IMAGE_PIXELS`` and warning filters are left
alone (changing either is process-wide and not thread-safe); the policy's pixel limit is
enforced from the image header before any pixel is decoded, and PIL's own bomb check stays
as a second, process-wide ceiling. Preprocessing wraps the model's own Hugging Face image
processor (loaded with ``AutoImageProcessor``, so no torchvision is needed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.pixel_slots import MIB, SlotPixels
from vl.errors import image_too_large, image_too_many_pixels, invalid_base64, invalid_image
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy
from vl.pixel_budget import PixelBounds, processor_bounds
from vl.prep_config import PrepConfig
from vl.qwen2_vl_pixels import PixelBuffer, PixelSettings, Qwen2VLPixels, fast_pixels_for

if TYPE_CHECKING:
    import torch

# Formats a client may send. Limiting them keeps rarely used, risky decoders (EPS starts
# Ghostscript, for one) out of reach of untrusted input.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (phone cameras)

# What PIL raises for corrupt or truncated data (see Pillow's own fuzzing harness).
_CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(image: EncodedImage, policy: MediaPolicy, *, param: str) -> Image.Image:
    """A fully loaded RGB image decoded from ``image``, never larger than the policy allows.

    Base64 payloads are decoded strictly (no whitespace, no foreign characters). The byte cap
    (``policy.max_image_bytes``) is checked on the decoded bytes and the pixel cap
    (``policy.max_image_pixels``) on the header's width x height before decoding pixels.
    Palette, alpha (composited onto white), greyscale (8- and 16-bit) and CMYK images become
    RGB. Multi-frame images give their first frame.

    Raises ``MediaError`` naming ``param`` with code ``invalid_base64``, ``invalid_image``
    (empty, not an image, unsupported format, corrupt or truncated) or ``image_too_large``.
    Blocking and CPU-bound; thread-safe.
    """
    data = _raw_bytes(image, policy, param)
    try:
        opened = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        _check_pixels(opened.size, policy, param)
        opened.load()
        _check_pixels(opened.size, policy, param)  # some formats settle their size on load
        return _to_rgb(opened)  # the opened image is this call's own: no copy when already RGB
    except UnidentifiedImageError as exc:
        raise invalid_image(
            f"image data is not an image in a supported format ({', '.join(ACCEPTED_FORMATS)})", param
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by PIL's own ceiling, or its warning when the warnings filter makes it an error.
        raise image_too_many_pixels(param) from exc
    except _CORRUPT_DATA_ERRORS as exc:
        raise invalid_image("image data could not be decoded (corrupt or truncated)", param) from exc


def _raw_bytes(image: EncodedImage, policy: MediaPolicy, param: str) -> bytes:
    """The image file's bytes: base64-decoded if needed, and within the byte cap."""
    cap = policy.max_image_bytes
    payload = image.payload
    if image.base64_encoded:
        if len(payload) // 4 * 3 - 2 > cap:  # certainly over the cap: do not decode at all
            raise image_too_large(cap, param)
        try:
            payload = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid_base64(param) from exc
    if len(payload) > cap:
        raise image_too_large(cap, param)
    if not payload:
        raise invalid_image("image data is empty", param)
    return payload


def _check_pixels(size: tuple[int, int], policy: MediaPolicy, param: str) -> None:
    width, height = size
    if width * height > policy.max_image_pixels:
        raise image_too_many_pixels(param, (width, height), policy.max_image_pixels)


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB: a single-frame RGB image without transparency is returned as it is
    (a copy of a decoded 1024² photo costs ~0.7 ms); anything else becomes a new image."""
    if image.mode == "RGB" and not _has_alpha(image) and not getattr(image, "is_animated", False):
        return image
    if image.mode in _SIXTEEN_BIT_GREY_MODES:
        # PIL's I;16 -> L conversion clips at 255 instead of scaling: keep the high byte.
        grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a transparent palette entry / colour key (PNG ``tRNS``, GIF)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


# Preprocessing: a decoded image into patches ----------------------------------------------


@dataclass(frozen=True)
class PixelInputs:
    """One image's patches: ``pixel_values`` [patches, channels*t*p*p] (t: the processor's
    ``temporal_patch_size``, or 1 on the fast path, see ``vl.qwen2_vl_pixels``), grid
    (t, h, w). The values are a float32 NumPy array on the fast path (which imports no
    torch) and the processor's torch tensor otherwise: ``torch.as_tensor`` takes either
    without a copy, ``SlotMemory.write`` writes either."""

    pixel_values: np.ndarray | torch.Tensor
    grid_thw: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


@dataclass(frozen=True)
class SlotImage:
    """One image's patches written into a pixel slot: the descriptor to read them back
    (``SlotMemory.read(pixels)``), and their grid. Small and picklable: this, not the
    pixels, is what a prep process returns. ``decode_seconds`` and ``preprocess_seconds``
    (slot write included) were measured where the work ran (``vl.prep_timings``)."""

    pixels: SlotPixels
    grid_thw: tuple[int, int, int]
    num_patches: int
    decode_seconds: float = 0.0
    preprocess_seconds: float = 0.0


class ImagePreprocessor:
    """The model's image processor, run on one decoded image at a time; for a Qwen2-VL PIL
    processor through ``vl.qwen2_vl_pixels`` (the same output, a fraction of the work)."""

    def __init__(self, image_processor: Any, merge_size: int, *, settings: PixelSettings | None = None) -> None:
        """``image_processor``: the model's; or ``None`` with the ``settings`` of one, for
        the fast path alone (``from_settings``)."""
        if image_processor is None and settings is None:
            raise ValueError("an ImagePreprocessor needs an image processor or its PixelSettings")
        self._processor = image_processor
        if image_processor is None:
            self._fast = Qwen2VLPixels(settings)
            self.settings_key = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
        else:
            self._fast = fast_pixels_for(image_processor)
            self.settings_key = _settings_key(image_processor)
        self.merge_size = merge_size

    @classmethod
    def from_settings(cls, settings: PixelSettings, merge_size: int) -> ImagePreprocessor:
        """The fast path alone, built from a processor's ``PixelSettings`` (what a prep
        process gets) without loading the processor; its ``image_processor`` is ``None``."""
        return cls(None, merge_size, settings=settings)

    @property
    def pixel_settings(self) -> PixelSettings | None:
        """The fast path's settings (``None`` where the processor runs as it is)."""
        return None if self._fast is None else self._fast.settings

    def __call__(
        self, image: Image.Image, bounds: PixelBounds | None = None, *, out: PixelBuffer | None = None
    ) -> PixelInputs:
        """The patches of ``image``, resized to within ``bounds`` (``vl.pixel_budget``;
        ``None``: the processor's own). On the fast path the values are written into the
        array ``out(shape)`` gives, if given (a pixel slot's view); the processor's own
        path ignores ``out``."""
        if self._fast is not None:
            if bounds is None:
                pixel_values, grid = self._fast(image, out=out)
            else:
                pixel_values, grid = self._fast(
                    image, min_pixels=bounds.min_pixels, max_pixels=bounds.max_pixels, out=out
                )
            return PixelInputs(pixel_values=pixel_values, grid_thw=grid)
        if bounds is None:
            processed = self._processor(images=[image], return_tensors="pt")
        else:
            size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}
            processed = self._processor(images=[image], return_tensors="pt", size=size)
        grid = tuple(int(x) for x in processed["image_grid_thw"][0].tolist())
        return PixelInputs(pixel_values=processed["pixel_values"], grid_thw=grid)

    @property
    def image_processor(self) -> Any:
        return self._processor

    @property
    def pixel_bounds(self) -> PixelBounds | None:
        """The processor's own bounds on an image's pixels (``None`` if it has none)."""
        return processor_bounds(self._sizes)

    @property
    def token_pixels(self) -> int:
        """Pixels per image token: ``(patch_size x merge_size)²``."""
        return (self._patch_size * self.merge_size) ** 2

    @property
    def _patch_size(self) -> int:
        return int(_setting(self._sizes, "patch_size"))

    @property
    def _sizes(self) -> Any:
        """Where patch size and pixel bounds are read (``_setting``): the processor, or
        the fast path's ``PixelSettings`` when there is none."""
        return self._fast.settings if self._processor is None else self._processor

    @property
    def frames_per_patch(self) -> int | None:
        """Frames each ``pixel_values`` row holds: 1 on the fast path (``vl.qwen2_vl_pixels``),
        else the processor's ``temporal_patch_size`` (``None`` if it has none)."""
        if self._fast is not None:
            return self._fast.frames_per_patch
        return _setting(self._processor, "temporal_patch_size")

    @property
    def max_pixel_values_bytes(self) -> int:
        """Bytes of the largest ``pixel_values`` this preprocessor can return."""
        return self.largest_pixel_values_bytes()

    def largest_pixel_values_bytes(self, max_pixels: int | None = None) -> int:
        """Bytes of the largest ``pixel_values`` for images of at most ``max_pixels``
        pixels (default: the processor's own bound); see ``max_pixel_values_bytes``."""
        return max_pixel_values_bytes(self._sizes, max_pixels, frames=self.frames_per_patch)


def load_image_preprocessor(model_dir: str | Path, merge_size: int) -> ImagePreprocessor:
    """The preprocessor of the model in ``model_dir``: the fast path alone, built from the
    ``PixelSettings`` read from its ``preprocessor_config.json``, where that reproduces its
    processor (then nothing of transformers' image processing is imported); else the
    processor, loaded. Raises ``ModelLoadError`` if it cannot be loaded."""
    settings = PixelSettings.read(model_dir)
    if settings is not None:
        return ImagePreprocessor.from_settings(settings, merge_size)
    from engine.model_loader import load_image_processor

    return ImagePreprocessor(load_image_processor(model_dir), merge_size)


# Sizing pixel slots -----------------------------------------------------------------------

_CHANNELS = 3  # decode_image always gives RGB
_PIXEL_VALUE_BYTES = 4  # the processor returns float32


def max_pixel_values_bytes(image_processor: Any, max_pixels: int | None = None, *, frames: int | None = None) -> int:
    """Bytes of the largest ``pixel_values`` a Qwen2-VL-style image processor returns.

    Such a processor resizes every image to at most ``max_pixels`` pixels (``size
    ["longest_edge"]`` in recent transformers) with sides that are multiples of
    ``patch_size``, so an image has at most ``max_pixels / patch_size**2`` patches of
    ``3 x frames x patch_size**2`` float32 values each (``frames``: the processor's
    ``temporal_patch_size`` unless given; the fast path stores 1). Raises ``ValueError``
    for a processor without these settings (then size slots with ``--pixel-slot-mb``).
    ``max_pixels`` replaces the processor's own (the server's bound, ``vl.pixel_budget``)."""
    max_pixels = max_pixels or _setting(image_processor, "max_pixels") or _setting(image_processor, "longest_edge")
    patch_size = _setting(image_processor, "patch_size")
    temporal = frames or _setting(image_processor, "temporal_patch_size") or 1
    if not (max_pixels and patch_size):
        raise ValueError(
            f"cannot tell the largest image {type(image_processor).__name__} produces "
            "(no max_pixels / patch_size); set --pixel-slot-mb"
        )
    patches = int(max_pixels) // (int(patch_size) ** 2)
    return patches * _CHANNELS * int(temporal) * int(patch_size) ** 2 * _PIXEL_VALUE_BYTES


def slot_bytes_for(preprocessor: ImagePreprocessor | Any, config: PrepConfig, max_pixels: int | None = None) -> int:
    """Bytes per pixel slot: ``config.pixel_slot_mb`` MiB when set, else the largest
    ``pixel_values`` of ``preprocessor`` (an ``ImagePreprocessor`` or the Hugging Face image
    processor itself) for images of at most ``max_pixels`` (default: the processor's own
    limit; the server passes its bound, ``vl.pixel_budget``) rounded up to whole MiB."""
    if config.pixel_slot_mb:
        return config.pixel_slot_mb * MIB
    if isinstance(preprocessor, ImagePreprocessor):
        largest = preprocessor.largest_pixel_values_bytes(max_pixels)
    else:
        largest = max_pixel_values_bytes(preprocessor, max_pixels)
    return math.ceil(largest / MIB) * MIB


def _setting(image_processor: Any, name: str) -> Any:
    """``name`` as an attribute of the processor, else as an entry of its ``size``."""
    value = getattr(image_processor, name, None)
    if value is not None:
        return value
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict):
        return size.get(name)
    return getattr(size, name, None)


def _settings_key(processor: Any) -> str:
    """A short digest of the processor settings that change its output (cache key part)."""
    try:
        settings = processor.to_dict()
    except Exception:  # processors without to_dict: fall back to their repr
        settings = {"repr": repr(processor)}
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
