"""What the front end has yet to send to the step loop: new sequences and aborts."""

from __future__ import annotations

import trio

from engine.core_messages import NewSequence, Submit


class Outbox:
    """Pending adds and aborts, taken together as one ``Submit``.

    Event loop only, except ``__bool__``, which the step thread may read (a stale answer
    costs at most one extra decode sub-step).
    """

    def __init__(self) -> None:
        self._adds: list[NewSequence] = []
        self._aborts: list[int] = []
        self._changed = trio.Event()

    def add(self, new: NewSequence) -> None:
        self._adds.append(new)
        self._changed.set()

    def abort(self, new: NewSequence) -> bool:
        """Abort ``new``: if it has not been taken yet it is simply withdrawn (the step
        loop never sees it) and this returns True; else its id is queued as an abort."""
        if any(pending is new for pending in self._adds):
            self._adds = [pending for pending in self._adds if pending is not new]
            return True
        self._aborts.append(new.seq_id)
        self._changed.set()
        return False

    def take(self) -> Submit:
        """Everything pending, now emptied."""
        submit = Submit(self._adds, self._aborts)
        self._adds, self._aborts = [], []
        return submit

    async def wait(self) -> None:
        """Return once something is pending (at once if something is).

        Cancellation: safe; nothing is taken.
        """
        while not self:
            self._changed = trio.Event()
            await self._changed.wait()

    @property
    def pending_adds(self) -> int:
        return len(self._adds)

    def __bool__(self) -> bool:
        return bool(self._adds or self._aborts)
