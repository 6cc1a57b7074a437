"""Continuous-batching scheduler: plain synchronous code, testable without torch.

Sequences wait in FIFO order and join the running batch between steps, as long as the
batch has fewer than ``max_num_seqs`` rows, the step's prefill tokens fit in
``max_num_batched_tokens`` (a prompt longer than the budget runs alone) and the image
patches the step must encode for them fit in ``max_encoder_patches`` (the encoder budget;
a sequence over it alone still joins, alone). Finished and
aborted sequences leave the batch at the start of the next step. A new request never waits
for the batch to drain.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.sequence import Sequence, SequenceStatus


@dataclass
class StepPlan:
    """What one engine step does, in order: drop the ``leaving`` rows from the cache, run
    one decode forward for ``decoding`` (each feeds its last sampled token), then prefill
    ``joining`` (which samples their first token) and merge them into the batch."""

    leaving: list[Sequence] = field(default_factory=list)
    joining: list[Sequence] = field(default_factory=list)
    decoding: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.leaving or self.joining or self.decoding)


class Scheduler:
    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_encoder_patches: int | None = None,
        encoder_cost: Callable[[Sequence], int] = lambda seq: 0,
    ) -> None:
        """``encoder_cost(seq)`` is the image patches still to encode before ``seq`` can
        be prefilled; ``max_encoder_patches`` (``None``: no limit) bounds their sum per step."""
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_encoder_patches = max_encoder_patches
        self._encoder_cost = encoder_cost
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._leaving: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self._waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Mark ``seq`` aborted. A waiting one is dropped now; a running one leaves at the
        start of the next step, which frees its cache rows before anything else runs."""
        seq.abort_requested = True
        if seq.status is SequenceStatus.WAITING:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._leaving)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def schedule(self) -> StepPlan:
        """Plan the next step. Moves finished/aborted sequences out and waiting ones in."""
        plan = StepPlan()
        still_running = []
        for seq in self._running:
            if seq.finished or seq.abort_requested:
                plan.leaving.append(seq)
            else:
                still_running.append(seq)
        self._running = still_running
        for seq in plan.leaving:
            if not seq.finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"

        plan.decoding = list(self._running)
        budget = self.max_num_batched_tokens - len(plan.decoding)
        encoder_budget = self.max_encoder_patches
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting[0]
            if seq.prompt_len > budget and plan.joining:
                break  # an oversized prompt joins only as the first of its step
            if encoder_budget is not None:
                patches = self._encoder_cost(seq)
                if patches > encoder_budget and plan.joining:
                    break  # so do images over the step's encoder budget
                encoder_budget -= patches
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            plan.joining.append(seq)
            self._running.append(seq)
            budget -= seq.prompt_len
        return plan
