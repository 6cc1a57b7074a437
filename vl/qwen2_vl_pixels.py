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
3. the patch layout is the processor's reshape/transpose, copied once, into a NumPy
   array (a pixel slot's, when given): this module imports no torch.

The processor fills each patch's temporal axis (``temporal_patch_size`` = 2, made for
video) by repeating a still image's frame; here each row holds that frame once
(``3 * patch**2`` values instead of ``3 * temporal * patch**2``): half the bytes to write,
to keep in a pixel slot and to read. The engine's patch embedding takes such rows
(``engine/patch_embed.py``); ``engine.patch_embed.repeat_frame`` gives back the
processor's layout, bit for bit.

``PixelSettings.of(processor)`` takes what this path needs from the processor class it
was checked against (``tests/vl/test_qwen2_vl_pixels.py`` compares it with the processor
on images of many shapes), ``None`` for any other processor, which then runs as it is;
``PixelSettings.read(model_dir)`` reads the same from the model's
``preprocessor_config.json`` without loading the processor (the server's front end).
The settings are plain values, so a prep process builds the path from them without
loading the processor: transformers' image-processing modules import torch's compiler
stack (``torch._dynamo``, sympy: ~78 MiB of private memory and ~3 s per process), and
``fitted_size`` is the processor's ``smart_resize`` rule, written here for that reason
(the test compares the two).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

# the processor class whose steps this reproduces (the torchvision-backed classes resize
# differently and are left alone)
SUPPORTED_PROCESSORS = ("Qwen2VLImageProcessorPil",)
MAX_ASPECT_RATIO = 200  # the processor refuses images longer than this many times their width

# ``image_processor_type`` values of a preprocessor_config.json that AutoImageProcessor loads
# as the class above when torchvision is not installed
PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
# that class's defaults for what a preprocessor_config.json leaves out (tests compare them
# with the class)
PROCESSOR_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 3,  # PIL's BICUBIC
        "size": MappingProxyType({"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}),
        "rescale_factor": 1 / 255,
        "image_mean": (0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP's
        "image_std": (0.26862954, 0.26130258, 0.27577711),
        "patch_size": 14,
        "merge_size": 2,
    }
)

# gives the contiguous float32 array of a shape to write pixel values into
# (``SlotMemory.array_view``)
PixelBuffer = Callable[[tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class PixelSettings:
    """What the fast path needs of a Qwen2-VL image processor, as plain values (picklable,
    hashable): patch and merge sizes, pixel bounds, PIL resample filter, and the value
    table, ``[3, 256]`` float32 as bytes, that the processor's own rescale and normalise
    make of every byte value in each channel."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    resample: int
    value_table: bytes

    @classmethod
    def of(cls, processor: Any) -> PixelSettings | None:
        """The settings of ``processor`` if the fast path reproduces it, else ``None``."""
        if type(processor).__name__ not in SUPPORTED_PROCESSORS:
            return None
        try:
            if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
                return None
            return cls(
                patch_size=int(processor.patch_size),
                merge_size=int(processor.merge_size),
                min_pixels=int(processor.size.shortest_edge),
                max_pixels=int(processor.size.longest_edge),
                resample=int(processor.resample),
                value_table=_value_table(processor).tobytes(),
            )
        except (AttributeError, TypeError, ValueError):
            return None

    @classmethod
    def read(cls, model_dir: str | Path) -> PixelSettings | None:
        """The settings of the processor ``AutoImageProcessor`` would load from
        ``model_dir``, read from its ``preprocessor_config.json`` without loading it (the
        server's front end then imports none of transformers' image processing, as ``of``'s
        callers in prep processes do not); equal to ``of`` of that processor (the tests
        compare them over several configurations). ``None`` where that would not be the
        class this module reproduces (another type, or torchvision installed: its class
        is then the torchvision-backed one), where the file asks for anything else, or
        cannot be read: load the processor then."""
        if importlib.util.find_spec("torchvision") is not None:
            return None
        try:
            raw = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict) or raw.get("image_processor_type") not in PROCESSOR_TYPES:
            return None
        config = {**PROCESSOR_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
        # the processor's own rule: ``min_pixels`` / ``max_pixels`` override ``size``'s bounds
        size = dict(raw.get("size") or PROCESSOR_DEFAULTS["size"])
        if raw.get("min_pixels") is not None:
            size["shortest_edge"] = raw["min_pixels"]
        if raw.get("max_pixels") is not None:
            size["longest_edge"] = raw["max_pixels"]
        if set(size) != {"shortest_edge", "longest_edge"}:
            return None
        if not (config["do_resize"] and config["do_rescale"] and config["do_normalize"]):
            return None
        try:
            table = _read_value_table(float(config["rescale_factor"]), config["image_mean"], config["image_std"])
            return cls(
                patch_size=int(config["patch_size"]),
                merge_size=int(config["merge_size"]),
                min_pixels=int(size["shortest_edge"]),
                max_pixels=int(size["longest_edge"]),
                resample=int(config["resample"]),
                value_table=table.tobytes(),
            )
        except (TypeError, ValueError):
            return None


class Qwen2VLPixels:
    """Preprocesses a decoded RGB PIL image into ``(pixel_values, grid_thw)``: the grid
    ``processor(images=[image], return_tensors="pt")`` gives, and its pixel values with
    each patch's frame once instead of repeated over the temporal axis. Thread-safe (no
    state changes after construction)."""

    frames_per_patch = 1  # frames each row holds (the processor's rows: temporal_patch_size)

    def __init__(self, settings: PixelSettings) -> None:
        self.settings = settings
        self._lut = np.frombuffer(settings.value_table, dtype=np.float32).reshape(3, 256)

    def target_size(
        self, width: int, height: int, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """(width, height) the processor resizes a ``width`` x ``height`` image to, with
        its own pixel bounds or the ones given (as its ``size`` argument would set them)."""
        settings = self.settings
        resized_height, resized_width = fitted_size(
            height,
            width,
            factor=settings.patch_size * settings.merge_size,
            min_pixels=settings.min_pixels if min_pixels is None else min_pixels,
            max_pixels=settings.max_pixels if max_pixels is None else max_pixels,
        )
        return resized_width, resized_height

    def __call__(
        self,
        image: Image.Image,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        out: PixelBuffer | None = None,
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """``image``'s pixel values [patches, 3 * patch**2] (one frame per patch) and grid
        (t, h, w).
        Raises ``ValueError`` where the processor does (e.g. an extreme aspect ratio).

        ``out(shape)``, if given, returns the contiguous float32 array of that shape to
        write the values into (a view of a pixel slot: the values are then written once,
        where they are read, instead of into a new array that is copied there); what it
        raises, this raises, before any value is written."""
        width, height = self.target_size(*image.size, min_pixels=min_pixels, max_pixels=max_pixels)
        resized = image.resize((width, height), resample=self.settings.resample)
        rgb = np.asarray(resized)  # [H, W, 3] uint8
        channels = np.empty((3, height, width), dtype=np.float32)
        for channel in range(3):
            # uint8 indices into a 256-entry table are always in range: "wrap" never changes
            # one, and unlike the default "raise" it writes into ``out`` unbuffered (0.46
            # instead of 0.85 ms for a 448² image)
            np.take(self._lut[channel], rgb[:, :, channel], out=channels[channel], mode="wrap")
        patch, merge = self.settings.patch_size, self.settings.merge_size
        grid_h, grid_w = height // patch, width // patch
        blocks = channels.reshape(3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        shape = (grid_h * grid_w, 3 * patch * patch)
        values = np.empty(shape, dtype=np.float32) if out is None else out(shape)
        patches = values.view()
        patches.shape = blocks.shape  # a view of the same memory (raises rather than copy)
        patches[...] = blocks
        return values, (1, grid_h, grid_w)


def fast_pixels_for(processor: Any) -> Qwen2VLPixels | None:
    """The fast path for ``processor`` if it is a processor it reproduces, with the
    settings it reads; else ``None``."""
    settings = PixelSettings.of(processor)
    return None if settings is None else Qwen2VLPixels(settings)


def fitted_size(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) Qwen2-VL's processor resizes an image to (its ``smart_resize``):
    each side a multiple of ``factor``, nearest to the image's, then scaled down or up
    (keeping the aspect ratio) until the area is within ``[min_pixels, max_pixels]``.
    Raises ``ValueError`` for an aspect ratio above ``MAX_ASPECT_RATIO``, as it does."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    fitted_height = round(height / factor) * factor
    fitted_width = round(width / factor) * factor
    if fitted_height * fitted_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        fitted_height = max(factor, math.floor(height / shrink / factor) * factor)
        fitted_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif fitted_height * fitted_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        fitted_height = math.ceil(height * grow / factor) * factor
        fitted_width = math.ceil(width * grow / factor) * factor
    return fitted_height, fitted_width


def _value_table(processor: Any) -> np.ndarray:
    """[3, 256] float32: what the processor's rescale + normalise make of each byte value
    in each channel, computed by the processor itself on a channel-first ramp image."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    values = processor.rescale(ramp, processor.rescale_factor)
    values = processor.normalize(values, processor.image_mean, processor.image_std)
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(3, 256))


def _read_value_table(rescale_factor: float, mean: Any, std: Any) -> np.ndarray:
    """[3, 256] float32: ``_value_table`` of a processor with these settings, by the same
    arithmetic as its NumPy ``rescale`` (float64 product, cast to float32) and
    ``normalize`` (float32 difference and quotient, per channel)."""
    mean = np.array(mean if isinstance(mean, list | tuple) else [mean] * 3, dtype=np.float32)
    std = np.array(std if isinstance(std, list | tuple) else [std] * 3, dtype=np.float32)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError("image_mean and image_std need one value or three")
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    rescaled = (ramp.astype(np.float64) * rescale_factor).astype(np.float32)
    return np.ascontiguousarray((rescaled - mean[:, None]) / std[:, None], dtype=np.float32)
