"""Encoded image bytes to a loaded RGB ``PIL.Image``, within the media policy.

Synchronous CPU work: callers run ``decode_image`` in a worker thread under the CPU-prep
limiter (``trio.to_thread.run_sync(..., limiter=...)``). It touches no global state: PIL's
``MAX_IMAGE_PIXELS`` and warning filters are left alone (changing either is process-wide and
not thread-safe); the policy's pixel limit is enforced from the image header before any pixel
is decoded, and PIL's own bomb check stays as a second, process-wide ceiling.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from vl.errors import (
    image_too_large,
    image_too_many_pixels,
    invalid_base64,
    invalid_image,
)
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy

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
        return _to_rgb(opened)
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
    """``image`` as RGB. Never returns the input object itself, so the caller owns the result."""
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
