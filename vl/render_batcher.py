"""Chat templates rendered and tokenized in batches: the chats waiting for the tokenizer
gate go through it together, in one call (``RenderChats``).

Why: a closed loop of clients (and any burst) sends its requests in waves, and a wave of
chats queued at the tokenizer gate one call each, every call a round trip to the prep
process (~4 ms held for ~1 ms of CPU on a loaded 2-core host). In a 64-stream text burst
the mean request waited 79 ms for the gate, more than its engine queue and prefill
together (bench/README.md, "Chats tokenized in batches"). One call for the whole wave pays
the round trip once.

Who owns what (docs/architecture.md, "Processes and ownership"): ``RenderBatcher.open``
owns one batch task per token of the tokenizer gate. A batch task waits for queued chats,
takes them all (at most ``max_batch``) and runs one ``RenderChats`` step holding one gate
token, through the ``PrepRunner`` (in a prep process by default), then hands each chat its
outcome. A batch is shared work: it belongs to the batcher, not to any request in it, so
it runs to its end whatever happens to them. A caller cancelled while its chat is still
queued takes it out of the queue (it is never rendered); a caller cancelled while its
batch runs leaves at once, and its result is dropped.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from vl.gates import BorrowTimes, Gate
from vl.prep_tools import PrepRunner, RenderChats

# A batch's callers all wake in one scheduler pass when it ends: 32 at once held passes
# long enough to double the loop lag and /health p99 of a 64-stream burst; 8, the stream
# fan-out's bound, kept them at per-chat calls' level (bench/README.md).
MAX_BATCH = 8


class _Queued:
    """One chat waiting for its batch, and its outcome once the batch has run."""

    __slots__ = ("done", "messages", "outcome", "taken", "times")

    def __init__(self, messages: list[dict], times: BorrowTimes) -> None:
        self.messages = messages
        self.times = times
        self.taken = False
        self.outcome: list[int] | BaseException | None = None
        self.done = trio.Event()


class RenderBatcher:
    """Renders chats under ``gate`` through ``runner``, the waiting ones in one call."""

    def __init__(self, runner: PrepRunner, gate: Gate, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("a render batch holds at least one chat")
        self.gate = gate
        self._runner = runner
        self._max_batch = max_batch
        self._queue: deque[_Queued] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False  # set once ``open``'s block has ended: nothing serves the queue
        self.batches = 0  # calls made
        self.chats = 0  # chats those calls rendered

    @classmethod
    @asynccontextmanager
    async def open(cls, runner: PrepRunner, gate: Gate, max_batch: int = MAX_BATCH) -> AsyncIterator[RenderBatcher]:
        """Serve ``render`` for the duration of the block, with one batch task per token
        of ``gate``. Leaving the block (or its cancellation) waits for the batches running
        (their work is never abandoned) and fails every chat not rendered by then with
        ``RuntimeError``."""
        batcher = cls(runner, gate, max_batch)
        async with trio.open_nursery() as nursery:
            for _ in range(int(gate.limiter.total_tokens)):
                nursery.start_soon(batcher._serve)
            try:
                yield batcher
            finally:
                nursery.cancel_scope.cancel()
        batcher._fail_queued()

    async def render(self, messages: list[dict], times: BorrowTimes | None = None) -> list[int]:
        """Token ids of ``messages`` (``Chat.template_messages()``) rendered with the chat
        template, as ``RenderChat`` makes them, in one call with the other chats waiting.

        ``times`` (if given) gets when this chat was queued (``asked``) and when its batch
        took and gave back its gate token. Raises the ``InvalidRequest`` the template
        raised for this chat, or what the call raised for the whole batch (e.g.
        ``PrepFailed`` if the prep process died), and ``RuntimeError`` at once once the
        batcher has closed. Cancellation: a chat still queued is withdrawn and never
        rendered; once its batch runs, this returns at once and the batch runs on without it.
        """
        if self._closed:
            raise _stopped()
        queued = _Queued(messages, times or BorrowTimes())
        queued.times.asked = trio.current_time()
        self._queue.append(queued)
        self._lot.unpark()
        try:
            await queued.done.wait()
        finally:
            if not queued.taken:
                self._queue.remove(queued)
        if isinstance(queued.outcome, BaseException):
            raise queued.outcome
        assert queued.outcome is not None
        return queued.outcome

    @property
    def queued(self) -> int:
        """Chats waiting for a batch (not yet taken by a batch task)."""
        return len(self._queue)

    async def _serve(self) -> None:
        """One batch task: take what is queued, render it in one call, deliver; forever."""
        while True:
            while not self._queue:
                await self._lot.park()
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
            for queued in batch:
                queued.taken = True
            times = BorrowTimes()
            try:
                outcomes: list = await self._runner.run(self.gate, RenderChats(tuple(q.messages for q in batch)), times)
            except Exception as exc:  # the call failed as a whole: each chat gets its own copy
                outcomes = [copy.copy(exc) for _ in batch]
            except BaseException:
                _deliver(batch, [_stopped() for _ in batch])
                raise
            self.batches += 1
            self.chats += len(batch)
            for queued in batch:
                queued.times.acquired, queued.times.released = times.acquired, times.released
            _deliver(batch, outcomes)

    def _fail_queued(self) -> None:
        self._closed = True
        waiting = list(self._queue)
        self._queue.clear()
        for queued in waiting:
            queued.taken = True  # out of the queue: ``render`` has nothing to withdraw
        _deliver(waiting, [_stopped() for _ in waiting])


def _stopped() -> RuntimeError:
    return RuntimeError("the server stopped before this chat was tokenized")


def _deliver(batch: list[_Queued], outcomes: list) -> None:
    for queued, outcome in zip(batch, outcomes, strict=True):
        queued.outcome = outcome
        queued.done.set()
