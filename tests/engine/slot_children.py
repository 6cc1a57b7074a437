"""Work for child processes in the pixel-slot tests: importable by spawned processes."""

from __future__ import annotations

import torch

from engine.pixel_slots import SlotMemory, SlotPixels, SlotSpec


def seeded_tensor(seed: int, shape: tuple[int, ...] = (37, 1176)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def attach_and_write(spec: SlotSpec, index: int, seed: int) -> SlotPixels:
    """Attach to ``spec`` in this process, write ``seeded_tensor(seed)`` into slot ``index``."""
    memory = SlotMemory.attach(spec)
    try:
        return memory.write(index, seeded_tensor(seed))
    finally:
        memory.close()
