"""Qwen2-VL-style image preprocessing in three array operations, equal to the Hugging Face
processor's output with each frame stored once.

transformers' PIL-backend ``Qwen2VLImageProcessorPil`` turns the decoded image into a
NumPy array, back into a PIL image to resize it, into NumPy again, then rescales
(float64, cast to float32) and normalises in separate passes before patchifying. The
same result, from the same PIL resize, costs a fraction of that:

1. ``smart_resize`` (transformers' own function) gives the target size and the PIL image
   is resized once, as the processor does (same filter, same uint8 input);
2. rescale + normalise is a per-channel lookup table of 256 float32 values, computed by
   the processor's own ``rescale`` and ``normalize`` on a ramp of every byte value, so
   every pixel gets the bits the processor would compute for it;
3. the patch layout is the processor's reshape/transpose, copied once.

The processor fills each patch's temporal axis (``temporal_patch_size`` = 2, made for
video) by repeating a still image's frame; here each row holds that frame once
(``3 * patch**2`` values instead of ``3 * temporal * patch**2``): half the bytes to write,
to keep in a pixel slot and to read. The engine's patch embedding takes such rows
(``engine/patch_embed.py``); ``engine.patch_embed.repeat_frame`` gives back the
processor's layout, bit for bit.

``fast_pixels_for(processor)`` returns this path for the processor class it was checked
against (``tests/vl/test_qwen2_vl_pixels.py`` compares it with the processor on images
of many shapes) and ``None`` for any other processor, which then runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

# the processor class whose steps this reproduces (the torchvision-backed classes resize
# differently and are left alone)
SUPPORTED_PROCESSORS = ("Qwen2VLImageProcessorPil",)

# gives the float32 tensor of a shape to write pixel values into (``SlotMemory.tensor_view``)
PixelBuffer = Callable[[tuple[int, ...]], torch.Tensor]


class Qwen2VLPixels:
    """Preprocesses a decoded RGB PIL image into ``(pixel_values, grid_thw)``: the grid
    ``processor(images=[image], return_tensors="pt")`` gives, and its pixel values with
    each patch's frame once instead of repeated over the temporal axis. Thread-safe (no
    state changes after construction)."""

    frames_per_patch = 1  # frames each row holds (the processor's rows: temporal_patch_size)

    def __init__(self, processor: Any) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        self._smart_resize = smart_resize
        self._patch = int(processor.patch_size)
        self._merge = int(processor.merge_size)
        self._min_pixels = int(processor.size.shortest_edge)
        self._max_pixels = int(processor.size.longest_edge)
        self._resample = processor.resample
        self._lut = _value_table(processor)  # [3, 256] float32

    def target_size(
        self, width: int, height: int, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """(width, height) the processor resizes a ``width`` x ``height`` image to, with
        its own pixel bounds or the ones given (as its ``size`` argument would set them)."""
        resized_height, resized_width = self._smart_resize(
            height,
            width,
            factor=self._patch * self._merge,
            min_pixels=self._min_pixels if min_pixels is None else min_pixels,
            max_pixels=self._max_pixels if max_pixels is None else max_pixels,
        )
        return resized_width, resized_height

    def __call__(
        self,
        image: Image.Image,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        out: PixelBuffer | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``image``'s pixel values [patches, 3 * patch**2] (one frame per patch) and grid
        (t, h, w).
        Raises ``ValueError`` where the processor does (e.g. an extreme aspect ratio).

        ``out(shape)``, if given, returns the contiguous float32 tensor of that shape to
        write the values into (a view of a pixel slot: the values are then written once,
        where they are read, instead of into a new array that is copied there); what it
        raises, this raises, before any value is written."""
        width, height = self.target_size(*image.size, min_pixels=min_pixels, max_pixels=max_pixels)
        resized = image.resize((width, height), resample=self._resample)
        rgb = np.asarray(resized)  # [H, W, 3] uint8
        channels = np.empty((3, height, width), dtype=np.float32)
        for channel in range(3):
            # uint8 indices into a 256-entry table are always in range: "wrap" never changes
            # one, and unlike the default "raise" it writes into ``out`` unbuffered (0.46
            # instead of 0.85 ms for a 448² image)
            np.take(self._lut[channel], rgb[:, :, channel], out=channels[channel], mode="wrap")
        patch, merge = self._patch, self._merge
        grid_h, grid_w = height // patch, width // patch
        blocks = channels.reshape(3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        shape = (grid_h * grid_w, 3 * patch * patch)
        values = torch.from_numpy(np.empty(shape, dtype=np.float32)) if out is None else out(shape)
        values.numpy().reshape(blocks.shape)[...] = blocks  # a view: reshape of contiguous
        return values, (1, grid_h, grid_w)


def fast_pixels_for(processor: Any) -> Qwen2VLPixels | None:
    """The fast path for ``processor`` if it is a processor it reproduces, with the
    settings it reads; else ``None``."""
    if type(processor).__name__ not in SUPPORTED_PROCESSORS:
        return None
    try:
        if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
            return None
        return Qwen2VLPixels(processor)
    except (AttributeError, TypeError, ValueError):
        return None


def _value_table(processor: Any) -> np.ndarray:
    """[3, 256] float32: what the processor's rescale + normalise make of each byte value
    in each channel, computed by the processor itself on a channel-first ramp image."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    values = processor.rescale(ramp, processor.rescale_factor)
    values = processor.normalize(values, processor.image_mean, processor.image_std)
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(3, 256))
