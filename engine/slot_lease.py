"""``SlotLease``: the pixel slots of one prepared prompt, shared by its request and the
engine, released once neither needs them.

A prompt's images sit in shared-memory slots (``engine.pixel_slots``) from preparation
until the engine's vision encoder has encoded them (it reads them in place). The creator (the request that prepared the prompt)
holds the lease until it has submitted every sequence of the prompt, or until it ends,
whichever comes first (``release_creator``, idempotent, so both paths may call it). The
engine front end takes one hold per sequence it submits and drops it when the step loop
reports the pixels read (or the sequence is withdrawn unsent, or the step loop stops).
The slots go back to their pool when no hold is left: never while a submitted sequence
may still read them or the request may still submit one. Event loop only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.pixel_slots import Slot


class SlotLease:
    def __init__(self, slots: Iterable[Slot]) -> None:
        """A lease on ``slots``, held by its creator."""
        self._slots = list(slots)
        self._creator = True
        self._holds = 0
        self._released = False

    def hold(self) -> None:
        """One more holder (a submitted sequence). Raises ``RuntimeError`` once the slots
        are released."""
        if self._released:
            raise RuntimeError("this prompt's pixel slots were released already")
        self._holds += 1

    def drop(self) -> None:
        """Give up one ``hold``; the last hold, with the creator's gone, releases the slots."""
        if self._holds == 0:
            raise RuntimeError("dropped a pixel-slot lease more often than it was held")
        self._holds -= 1
        self._release_if_unheld()

    def release_creator(self) -> None:
        """The creator's hold ends (idempotent)."""
        self._creator = False
        self._release_if_unheld()

    def _release_if_unheld(self) -> None:
        if not self._creator and self._holds == 0 and not self._released:
            self._released = True
            for slot in self._slots:
                slot.release()

    @property
    def released(self) -> bool:
        return self._released

    def __len__(self) -> int:
        return len(self._slots)
