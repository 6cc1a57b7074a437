"""``SlotLease``: the pixel slots of one prepared prompt, shared by its request and the
engine, released once neither needs them.

A prompt's images sit in shared-memory slots (``engine.pixel_slots``) from preparation
until the step loop has copied them. The request holds the lease from preparation to its
end (however it ends); the engine front end takes one more hold per sequence it submits
with the prompt and drops it when the step loop reports the pixels read (or the sequence
is withdrawn unsent, or the step loop stops). The slots go back to their pool when the
last hold is dropped: never while a submitted sequence may still read them, never later
than the end of the request and of its sequences' arrival. Event loop only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.pixel_slots import Slot


class SlotLease:
    def __init__(self, slots: Iterable[Slot]) -> None:
        """A lease on ``slots`` with one hold: the creator's."""
        self._slots = list(slots)
        self._holds = 1

    def hold(self) -> None:
        """One more holder. Raises ``RuntimeError`` once the slots are released."""
        if self._holds == 0:
            raise RuntimeError("this prompt's pixel slots were released already")
        self._holds += 1

    def drop(self) -> None:
        """Give up one hold; the last one releases every slot."""
        if self._holds == 0:
            raise RuntimeError("dropped a pixel-slot lease more often than it was held")
        self._holds -= 1
        if self._holds == 0:
            for slot in self._slots:
                slot.release()

    @property
    def released(self) -> bool:
        return self._holds == 0

    def __len__(self) -> int:
        return len(self._slots)
