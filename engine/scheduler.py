"""Continuous-batching scheduler: plain synchronous code, testable without torch.

Each step has a token budget (``max_num_batched_tokens``) shared by decodes and prefill
chunks: every running sequence that has its prompt in the cache decodes one token, then
sequences part-way through their prompt get their next chunk, then waiting sequences join
(FIFO) while the batch has fewer than ``max_num_seqs`` rows, budget is left, the step's
prefill chunks padded to the longest still fit the budget (``_PaddedChunks``), their first
chunk's blocks fit in the KV cache, and their images fit the step's encoder budget
(``max_encoder_patches``; one over it alone still joins, alone). A long prompt is thus
prefilled over several steps while running streams keep decoding. With
``chunked_prefill=False`` a prompt is prefilled whole (one over the budget joins only as
the first of its step).

Memory (``engine.block_manager``): a joining sequence first takes its cached prefix, then
blocks for its first chunk. When a running sequence needs a block and none is free, the
newest running sequence is preempted: its blocks are freed and it waits at the head of the
queue, to be recomputed (prompt and outputs so far) when it joins again. Finished and
aborted sequences leave at the start of the next step, freeing their blocks before
anything else runs. A new request never waits for the batch to drain.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class StepPlan:
    """What one engine step does, in order: forget the ``leaving`` and ``preempted`` rows
    (their blocks are free already), run one decode forward for ``decoding`` (each feeds its
    last sampled token), then one prefill forward over ``continuing`` and ``joining`` (new
    this step: their images are encoded now), ``chunks[seq_id]`` tokens each; a sequence
    whose chunk reaches its last token samples its next one."""

    leaving: list[Sequence] = field(default_factory=list)
    joining: list[Sequence] = field(default_factory=list)
    decoding: list[Sequence] = field(default_factory=list)
    continuing: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    chunks: dict[int, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.leaving or self.joining or self.decoding or self.continuing or self.preempted)

    @property
    def prefill(self) -> list[tuple[Sequence, int]]:
        return [(seq, self.chunks[seq.seq_id]) for seq in self.continuing + self.joining]


class Scheduler:
    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_encoder_patches: int | None = None,
        encoder_cost: Callable[[Sequence], int] = lambda seq: 0,
        blocks: BlockManager | None = None,
        chunked_prefill: bool = True,
    ) -> None:
        """``encoder_cost(seq)`` is the image patches still to encode before ``seq`` can
        be prefilled; ``max_encoder_patches`` (``None``: no limit) bounds their sum per step.
        ``blocks`` is the KV cache's accounting (``None``: unlimited memory, no blocks)."""
        self.blocks = blocks
        self.chunked_prefill = chunked_prefill
        self.preemptions = 0
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

    def waiting_newest_first(self) -> Iterator[Sequence]:
        """The waiting sequences, the last to join first (a view: no copy; the queue must
        not change while it is read)."""
        return reversed(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def schedule(self) -> StepPlan:
        """Plan the next step (see the module docstring)."""
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
            if self.blocks is not None:
                self.blocks.free(seq)

        budget = self.max_num_batched_tokens
        for seq in list(self._running):  # oldest first
            if seq.status is SequenceStatus.RUNNING and self._prefilled(seq):
                if self._reserve(seq, seq.num_tokens, plan):
                    plan.decoding.append(seq)
                    budget -= 1
        padded = _PaddedChunks(self.max_num_batched_tokens)
        for seq in list(self._running):
            if seq.status is not SequenceStatus.RUNNING or self._prefilled(seq) or seq in plan.decoding:
                continue
            if budget <= 0:
                break
            n = self._chunk(seq, budget)
            if not padded.fits(n):
                continue
            if self._reserve(seq, seq.num_computed_tokens + n, plan):
                plan.continuing.append(seq)
                plan.chunks[seq.seq_id] = n
                padded.add(n)
                budget -= n

        encoder_budget = self.max_encoder_patches
        # after a preemption nobody joins this step (the pool is short: let it drain)
        while self._waiting and not plan.preempted and len(self._running) < self.max_num_seqs and budget > 0:
            seq = self._waiting[0]
            if encoder_budget is not None:
                patches = self._encoder_cost(seq)
                if patches > encoder_budget and (plan.joining or plan.continuing):
                    break  # images over the step's encoder budget join only as the first
            if self.blocks is not None:
                self.blocks.start(seq)  # takes its cached prefix
            if self._chunk(seq, budget) > budget and (plan.joining or plan.continuing):
                self._unstart(seq)
                break  # an oversized prompt joins only as the first of its step
            n = self._chunk(seq, budget)
            if not padded.fits(n):
                self._unstart(seq)
                break  # its chunk would pad the step's prefill past the budget: next step
            if self.blocks is not None and not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                self._unstart(seq)
                break  # waits until blocks are freed (FIFO: nobody overtakes it)
            if self.blocks is not None:
                self.blocks.allocate(seq, seq.num_computed_tokens + n)
                self.blocks.count_query(seq)
            if encoder_budget is not None:
                encoder_budget -= self._encoder_cost(seq)
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            plan.joining.append(seq)
            plan.chunks[seq.seq_id] = n
            padded.add(n)
            self._running.append(seq)
            budget -= n
        return plan

    def _prefilled(self, seq: Sequence) -> bool:
        """Without block accounting (``blocks=None``) a sequence that joined decodes."""
        return True if self.blocks is None else seq.prefilled

    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        return min(remaining, budget) if self.chunked_prefill and self.blocks is not None else remaining

    def _unstart(self, seq: Sequence) -> None:
        if self.blocks is not None:
            self.blocks.free(seq)

    def _reserve(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Blocks for ``seq``'s first ``num_tokens`` tokens, preempting the newest running
        sequences until they fit; False if ``seq`` itself had to go."""
        if self.blocks is None:
            return True
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self._running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Free ``seq``'s blocks and put it at the head of the queue (it is recomputed)."""
        self._running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self._waiting.appendleft(seq)
        self.preemptions += 1
        plan.preempted.append(seq)
        for group in (plan.decoding, plan.continuing, plan.joining):
            if seq in group:
                group.remove(seq)
        plan.chunks.pop(seq.seq_id, None)


class _PaddedChunks:
    """The prefill chunks of one step run as one forward whose rows are padded to the
    longest chunk, so that forward costs rows x longest tokens, not the chunks' sum. A
    chunk fits while that product stays within ``budget``; the first always fits (the
    token budget bounds it). Without this a step could hold one 2,000-token prompt and 60
    prefix-cache hits of 30 tokens each, and cost 61 full prefills."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._rows = 0
        self._longest = 0

    def fits(self, n: int) -> bool:
        return self._rows == 0 or (self._rows + 1) * max(self._longest, n) <= self._budget

    def add(self, n: int) -> None:
        self._rows += 1
        self._longest = max(self._longest, n)
