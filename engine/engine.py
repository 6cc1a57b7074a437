"""The engine component: owns the model, its step loop and every sequence's lifetime.

``Engine.open(...)`` is an async context manager whose nursery owns the step loop. Each
step is planned on the event loop (cheap, synchronous scheduler), executed in a worker
thread under the device gate (``trio.to_thread.run_sync`` with the default
``abandon_on_cancel=False``: the loop always waits for the step it started), and its
results are handed to the per-request streams on the event loop. Model forwards therefore
never run on the event loop and never two at once (the vision encoder shares the gate).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from engine.engine_core import EngineCore, StepReport
from engine.prompt import EnginePrompt
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_tally import EngineStatistics, StepTally
from engine.stream_registry import StreamRegistry
from engine.submit_checks import check_submittable

if TYPE_CHECKING:
    from engine.model_loader import LoadedModel

STALL_SECONDS = 60.0


class Engine:
    def __init__(
        self, core: EngineCore, scheduler: Scheduler, device_gate: trio.CapacityLimiter, stream_interval: float = 0.0
    ) -> None:
        self._core = core
        self._scheduler = scheduler
        self._device_gate = device_gate
        self._streams = StreamRegistry(stream_interval)
        self._wakeup = trio.Event()
        self._tally = StepTally()
        self._last_progress = time.monotonic()
        self._loop_alive = False
        self._closing = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls, core: EngineCore, scheduler: Scheduler, device_gate: trio.CapacityLimiter, stream_interval: float = 0.0
    ) -> AsyncIterator[Engine]:
        """Run the engine for the duration of the block.

        On exit (or cancellation of the block) the step loop is cancelled after its
        current step's thread returns, and every open stream ends with ``"abort"``.
        """
        engine = cls(core, scheduler, device_gate, stream_interval)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine._step_loop)
            try:
                yield engine
            finally:
                engine._closing = True
                nursery.cancel_scope.cancel()
                engine._abort_all("the engine stopped before this request finished")

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    @asynccontextmanager
    async def open_stream(self, prompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[RequestStream]:
        """Submit a sequence; yield its stream of deltas.

        Leaving the block before the last delta (break, exception, cancellation) aborts
        the sequence: a waiting one is dropped at once, a running one leaves the batch
        and frees its cache at the start of the next step.
        """
        self._validate(prompt, params)
        if not self._loop_alive or self._closing:
            raise RuntimeError("the engine is not running")
        stream = self._streams.open(prompt, params)
        seq = stream.seq
        self._scheduler.add(seq)
        self._wakeup.set()
        try:
            yield stream
        finally:
            self._streams.close(stream)
            if not seq.finished:
                self._scheduler.abort(seq)
                self._wakeup.set()

    def _validate(self, prompt: EnginePrompt, params: SamplingParams) -> None:
        check_submittable(prompt, params, self._core.max_model_len, self._core.runner.adapter.supports_images)

    async def _step_loop(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._loop_alive = True
        task_status.started()
        try:
            while True:
                if not self._scheduler.has_work():
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    self._last_progress = time.monotonic()
                    continue
                plan = self._scheduler.schedule()
                if plan.empty:
                    await trio.lowlevel.checkpoint()
                    continue
                report = await trio.to_thread.run_sync(self._core.execute, plan, limiter=self._device_gate)
                self._deliver(report)
        finally:
            self._loop_alive = False
            self._abort_all("the engine's step loop stopped")

    def _deliver(self, report: StepReport) -> None:
        self._tally.record(report)
        self._last_progress = time.monotonic()
        for update in report.updates:
            stream = self._streams.get(update.seq.seq_id)
            if stream is not None:
                stream.push(update)

    def _abort_all(self, reason: str) -> None:
        """End every open stream with ``abort`` and an error (the request did not finish)."""
        for stream in self._streams.open_streams():
            self._scheduler.abort(stream.seq)
            stream.seq.error = stream.seq.error or reason
            stream.finish("abort")

    def is_healthy(self) -> bool:
        """False only if the step loop died, or has had work but no step for a long time."""
        if not self._loop_alive:
            return False
        if not self._scheduler.has_work():
            return True
        return time.monotonic() - self._last_progress < STALL_SECONDS

    def statistics(self) -> EngineStatistics:
        return self._tally.statistics(self._scheduler, self._core.runner, self._device_gate.borrowed_tokens)


@asynccontextmanager
async def open_engine(
    loaded: "LoadedModel",
    *,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 8192,
    device_gate: trio.CapacityLimiter | None = None,
    seed: int | None = None,
    stream_interval: float = 0.0,
    decode_steps_per_call: int = 1,
) -> AsyncIterator[Engine]:
    """Compose runner, core and scheduler for a loaded model and run the engine (see
    ``Engine.open`` for the lifetime and cancellation rules)."""
    scheduler = Scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    core = EngineCore.for_model(
        loaded,
        seed=seed,
        decode_steps_per_call=decode_steps_per_call,
        # read from the step thread: a stale answer costs at most one extra sub-step
        has_news=lambda: scheduler.num_waiting > 0,
    )
    async with Engine.open(core, scheduler, device_gate or trio.CapacityLimiter(1), stream_interval) as engine:
        yield engine
