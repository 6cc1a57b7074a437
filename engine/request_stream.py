"""The consumer side of one sequence: ``SequenceOutput``s in, coalesced ``StreamDelta``s out.

No torch import here."""

from __future__ import annotations

import random
import time

import trio

from engine.core_messages import SequenceOutput
from engine.outputs import StreamDelta, TokenLogprob


class RequestStream:
    """Buffers updates for one sequence until its consumer asks for them.

    All methods run on the event loop. The buffer is bounded by the sequence's
    ``max_tokens``, so a slow consumer gets one larger delta instead of many small ones
    and never blocks the engine. With ``min_interval`` > 0, deltas after the first are
    at least that many seconds apart (tokens arriving faster are delivered together),
    except the last, which is delivered as soon as the sequence finishes: per-event work
    on the event loop then stays bounded however fast the engine steps.

    With ``final_only`` the consumer gets one delta, everything, once the sequence has
    finished (a response that is not streamed needs nothing sooner): it sleeps through the
    steps instead of waking after each. Every delta says when the first token arrived
    (``StreamDelta.first_token_time``).

    ``spread`` (from 0 to 1) lengthens each interval by a random fraction of up to
    ``spread`` times ``min_interval``, drawn from ``rng``. Streams fed by the same engine
    step would otherwise all wake in the same scheduler batch forever after; spread out,
    each batch of the event loop holds a few of them, and a request that arrives meanwhile
    (``/health``) waits behind a few streams' work instead of all of them.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_len: int,
        *,
        wants_logprobs: bool = False,
        final_only: bool = False,
        min_interval: float = 0.0,
        spread: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.prompt_len = prompt_len
        self._wants_logprobs = wants_logprobs
        self._final_only = final_only
        self._first_token_time: float | None = None
        self.error: str | None = None
        self._min_interval = min_interval
        self._spread = spread
        self._rng = rng or random.Random()
        self._next_take = float("-inf")
        self._finished = trio.Event()
        self._token_ids: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._finish_reason: str | None = None
        self._completion_tokens = 0
        self._delivered_final = False
        self._changed = trio.Event()

    def push(self, update: SequenceOutput) -> None:
        """Called by the engine after a step (never blocks)."""
        if update.error is not None:
            self.error = update.error
        if update.token_ids and self._first_token_time is None:
            self._first_token_time = time.perf_counter()
        self._token_ids.extend(update.token_ids)
        if update.text:
            self._text.append(update.text)
        if update.logprobs:
            self._logprobs.extend(update.logprobs)
        self._completion_tokens += len(update.token_ids)
        if update.finish_reason is not None:
            self._finish_reason = update.finish_reason
            self._finished.set()
        if not self._final_only or self._finish_reason is not None:
            self._changed.set()

    def fail(self, error: str) -> None:
        """End the stream with ``"abort"`` and ``error`` unless it has already finished
        (e.g. the engine stopped, or its worker died)."""
        if self._finish_reason is not None:
            return
        self.error = self.error or error
        self._finish_reason = "abort"
        self._finished.set()
        self._changed.set()

    @property
    def finished(self) -> bool:
        """Whether the sequence has ended (its last output may not be taken yet)."""
        return self._finish_reason is not None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        """Wait for new output and return all of it as one delta.

        Cancellation: safe at any point; nothing is lost from the buffer, and the stream's
        owner (``AsyncEngine.open_stream``) aborts the sequence when the consumer leaves.
        """
        while True:
            if self._delivered_final:
                raise StopAsyncIteration
            has_output = bool(self._token_ids or self._text) and not self._final_only
            if not (has_output or self._finish_reason is not None):
                # nothing to give: sleep until something arrives (no timer: a consumer
                # whose interval ends before the next step's output does not wake for nothing;
                # a final-only stream is told only of its end)
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            if self._finish_reason is None and trio.current_time() < self._next_take:
                with trio.move_on_at(self._next_take):
                    await self._finished.wait()
            if self._min_interval:
                stretch = 1.0 + self._spread * self._rng.random()
                self._next_take = trio.current_time() + self._min_interval * stretch
            return self._take()

    def _take(self) -> StreamDelta:
        delta = StreamDelta(
            text="".join(self._text),
            token_ids=self._token_ids,
            logprobs=self._logprobs if self._wants_logprobs else None,
            finish_reason=self._finish_reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=self._completion_tokens,
            first_token_time=self._first_token_time,
        )
        self._token_ids, self._text, self._logprobs = [], [], []
        if self._changed.is_set():  # what it announced is taken: the next wait is for new output
            self._changed = trio.Event()
        self._delivered_final = self._finish_reason is not None
        return delta
