"""The engine's one step loop: plain synchronous code that owns every ``Sequence``.

``StepLoop`` applies what the front end sent (new sequences, aborts), runs one step of the
scheduler and engine core while there is work, and reports each step's outputs with fresh
statistics. The same loop runs in either placement (docs/architecture.md):

- in the engine worker process, ``engine.worker_loop`` calls ``accept(submits)`` and
  ``run_step()`` in a worker thread under the worker's device gate while its event loop
  reads the socket (it never waits for the front end's event loop, nor shares its GIL);
- in a thread of the server process (``engine.thread_core``), the front end calls
  ``step(submit)`` once per step under the device gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.core_messages import NewSequence, SequenceOutput, StepOutputs, Submit
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.statistics import EngineStatistics, StepTally
from engine.step_timings import StepTimings

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.engine_core import EngineCore
    from engine.image_encoder import ViewPixels
    from engine.model_loader import LoadedModel


class StepLoop:
    """Sequences by id, the scheduler, the engine core and the step counters.

    Not thread-safe: one caller at a time (one step thread after another).
    """

    def __init__(self, core: EngineCore, scheduler: Scheduler, clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock`` times the queue (seconds, any origin)."""
        self._core = core
        self._clock = clock
        self._scheduler = scheduler
        self._sequences: dict[int, Sequence] = {}
        self._tally = StepTally()
        self._pixels_read: list[int] = []  # sequences whose pixel slots the front end may reuse
        self._early_updates: list[SequenceOutput] = []  # sequences failed on arrival
        self._arrived: dict[int, float] = {}  # waiting sequences: when they arrived (queue time)

    @classmethod
    def for_model(
        cls,
        loaded: LoadedModel,
        config: EngineConfig,
        *,
        has_news: Callable[[], bool] = lambda: False,
        view_pixels: ViewPixels | None = None,
    ) -> StepLoop:
        """The loop for a loaded model. ``has_news()`` (read from the step) says whether
        the front end has sent something since: it ends a run of back-to-back decode steps.
        ``view_pixels`` gives a tensor over an image's pixels in its slot (``SlotMemory.view``)."""
        from engine.engine_core import EngineCore

        core = EngineCore.for_model(
            loaded,
            config,
            # ``scheduler`` is bound below, before any step can call this
            has_news=lambda: scheduler.num_waiting > 0 or has_news(),
            view_pixels=view_pixels,
        )
        encoder = core.encoder
        scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_encoder_patches=config.vision_step_patches,
            encoder_cost=(lambda seq: encoder.patches_to_encode(seq.seq_id)) if encoder else (lambda seq: 0),
            blocks=core.runner.blocks,
            chunked_prefill=config.chunked_prefill,
        )
        return cls(core, scheduler)

    def has_work(self) -> bool:
        """Sequences to step, or images still being encoded ahead for sequences that left
        (their slots are reported once those forwards finish)."""
        encoder = self._core.encoder
        return self._scheduler.has_work() or (encoder is not None and encoder.ahead_busy)

    def close(self) -> None:
        """Stop the encoder's ahead thread (waiting for the forward it runs); idempotent."""
        if self._core.encoder is not None:
            self._core.encoder.close()

    def apply(self, submit: Submit) -> None:
        """Add the new sequences, then abort: a waiting sequence is forgotten at once (its
        images unencoded), a running one leaves the batch (freeing its cache) at the next
        step. A sequence aborted in the same submit is never added. Ids no longer known
        (finished already) are ignored. Every new sequence with pixels is reported once in
        ``pixels_read`` when its slots are free to reuse: at once if it is never added (or
        the model has no encoder), else when the encoder no longer reads them
        (``ImageEncoder.take_slots_done``: its images encoded, failed or dropped)."""
        aborted_now = set(submit.aborts)
        for new in submit.adds:
            if new.seq_id not in aborted_now:
                self._add(new)
            elif new.prompt.has_pixels:
                self._pixels_read.append(new.seq_id)
        for seq_id in submit.aborts:
            seq = self._sequences.get(seq_id)
            if seq is None:
                continue
            was_waiting = seq.status is SequenceStatus.WAITING
            self._scheduler.abort(seq)
            if was_waiting:
                self._sequences.pop(seq_id, None)
                self._arrived.pop(seq_id, None)
                self._core.release_images(seq)

    def _add(self, new: NewSequence) -> None:
        seq = Sequence(new.seq_id, new.prompt, new.params)
        if new.prompt.has_pixels and self._core.encoder is None:
            self._pixels_read.append(new.seq_id)  # nothing here reads slots
        try:
            self._core.admit_images(seq)  # the encoder reports its slots once it no longer reads them
        except Exception as exc:  # fails this sequence only
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            seq.error = f"the engine could not read this request's images: {type(exc).__name__}: {exc}"
            self._early_updates.append(SequenceOutput(seq.seq_id, [], "", None, "abort", seq.error))
            return
        self._sequences[seq.seq_id] = seq
        self._arrived[seq.seq_id] = self._clock()
        self._scheduler.add(seq)

    def step(self, submit: Submit | None = None) -> StepOutputs:
        """Apply ``submit``, then run one step if there is work. Always returns the
        statistics after it (with no updates if no step ran)."""
        if submit is not None:
            self.apply(submit)
        return self.run_step() or self._news()

    def accept(self, submits: list[Submit]) -> StepOutputs | None:
        """Apply ``submits`` in order; the outputs to send before the next step if any
        (pixel slots read, sequences failed on arrival), else ``None``."""
        for submit in submits:
            self.apply(submit)
        self._collect_slots_done()
        return self._news() if self._pixels_read or self._early_updates else None

    def news(self) -> StepOutputs:
        """Outputs with no step's updates: what ``accept`` left unsent, and statistics."""
        return self._news()

    def _news(self, step_updates: list[SequenceOutput] = (), timings: StepTimings | None = None) -> StepOutputs:
        """Outputs to send now: sequences failed on arrival, then ``step_updates`` (a
        step's, if one ran), the slots read since the last outputs, statistics, and the
        step's ``timings``."""
        self._collect_slots_done()
        outputs = StepOutputs(self._early_updates + list(step_updates), self.statistics(), self._pixels_read, timings)
        self._early_updates, self._pixels_read = [], []
        return outputs

    def _collect_slots_done(self) -> None:
        if self._core.encoder is not None:
            self._pixels_read.extend(self._core.encoder.take_slots_done())

    def run_step(self) -> StepOutputs | None:
        """One scheduled step and its outputs; ``None`` if there was nothing to run. With
        no sequence left but forwards still running on the encoder's ahead thread (their
        sequences left), waits for them and returns the outputs that report their slots."""
        encoder = self._core.encoder
        if not self._scheduler.has_work():
            if encoder is None or not encoder.ahead_busy:
                return None
            encoder.finish_ahead()  # only sequences that left are waiting for these forwards
            return self._news()
        plan = self._scheduler.schedule()
        if plan.empty:
            return None
        if encoder is not None:  # the images of those still waiting, encoded during this step
            encoder.encode_ahead(seq.seq_id for seq in self._scheduler.waiting_newest_first())
        scheduled = self._clock()
        queued = tuple(scheduled - self._arrived.pop(seq.seq_id, scheduled) for seq in plan.joining)
        report = self._core.execute(plan)
        for seq in plan.leaving:
            self._sequences.pop(seq.seq_id, None)
        self._tally.record(report)
        batches = encoder.take_batch_times() if encoder is not None else ()
        return self._news(report.updates, StepTimings(report.seconds, queued, batches))

    def statistics(self) -> EngineStatistics:
        return self._tally.statistics(self._scheduler, self._core.runner, self._core.encoder)
