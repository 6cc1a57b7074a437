"""Natural-looking, unique JPEG images: a gradient, a few shapes and sensor-like noise.

Every ``(seed, size)`` gives different pixels (so no server-side cache can help) and the
same bytes on every run and machine (numpy's PCG64 and Pillow's encoder are deterministic).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

NOISE_AMPLITUDE = 10  # grey levels; enough to make JPEG decode and size realistic
JPEG_QUALITY = 85


class NaturalImageMaker:
    """Makes JPEGs of one size. Holds a read-only noise field that every image crops from.

    Thread-safe: ``jpeg`` reads shared arrays only and builds everything else per call.
    """

    def __init__(self, size: int = 1024) -> None:
        if size < 64:
            raise ValueError("image size must be at least 64 pixels")
        self.size = size
        noise = np.random.default_rng(0).integers(
            -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(2 * size, 2 * size, 3), dtype=np.int16
        )
        noise.flags.writeable = False
        self._noise = noise
        self._ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)

    def jpeg(self, seed: int) -> bytes:
        """The JPEG bytes of image number ``seed`` (size x size, RGB)."""
        size = self.size
        rng = np.random.default_rng(seed)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * self._ramp[None, :] + np.sin(angle) * self._ramp[:, None]
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        start, end = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
        image = Image.fromarray((start + (end - start) * ramp[..., None]).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(6, 16))):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            w, h = (int(v) for v in rng.integers(size // 25, size // 2, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x0, y0, x0 + w, y0 + h], fill=colour)
        ox, oy = (int(v) for v in rng.integers(0, size, 2))
        pixels = np.asarray(image).astype(np.int16) + self._noise[oy : oy + size, ox : ox + size]
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()
