"""The engine's front end on the event loop, the same for both placements of its step loop.

``AsyncEngine`` numbers sequences, keeps each one's ``RequestStream``, queues new sequences
and aborts in an ``Outbox``, and hands every ``SequenceOutput`` to its stream. A *core*
carries the outbox to the step loop (``engine.step_loop``) and the outputs back:

- ``ThreadCore`` (``engine.thread_core``): the loop runs in a worker thread of this
  process, one step per ``trio.to_thread.run_sync`` under the device gate it shares with
  the vision encoder (``--no-engine-process``);
- ``WorkerCore`` (``engine.worker_core``): the loop runs in the engine worker process, over
  a socket pair (the default).

``open_engine(loaded, config)`` picks the core from ``config.in_worker_process``.

Lifetime: leaving ``open`` (or its cancellation) cancels the core's task after its current
step and ends every open stream with ``"abort"``. If the core stops on its own (its loop or
worker died), every open stream ends with ``"abort"`` and an error, ``is_healthy()`` turns
false, and new streams are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import trio

from engine.config import STREAM_FANOUT
from engine.core_messages import NewSequence, StepOutputs
from engine.outbox import Outbox
from engine.output_fanout import OutputFanout
from engine.request_stream import RequestStream
from engine.statistics import IDLE_STATISTICS, EngineStatistics
from engine.step_timings import EngineHistograms
from engine.stream_registry import StreamRegistry
from engine.submit_checks import check_submittable

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.model_card import ModelCard
    from engine.pixel_slots import SlotPool
    from engine.prompt import EnginePrompt
    from engine.sampling_params import SamplingParams
    from engine.slot_lease import SlotLease

logger = logging.getLogger("vlserve.engine")

# an engine that has had work but delivered nothing for this long is reported unhealthy
STALL_SECONDS = 60.0


class Core(Protocol):
    """Where the step loop runs, seen from the front end."""

    max_model_len: int
    supports_images: bool
    stopped_reason: str  # the error given to open streams if ``run`` returns on its own

    async def run(self, outbox: Outbox, deliver: Callable[[StepOutputs], None]) -> None:
        """Carry ``outbox`` to the step loop and each step's outputs to ``deliver``, until
        cancelled; return if the step loop is gone.

        Cancellation: returns only once no step is running on the front end's behalf.
        """
        ...


class AsyncEngine:
    def __init__(
        self,
        core: Core,
        stream_interval: float,
        device_gate: trio.CapacityLimiter | None = None,
        fanout_per_pass: int = STREAM_FANOUT,
    ) -> None:
        self.core = core
        self._device_gate = device_gate
        self._streams = StreamRegistry(stream_interval)
        self._fanout = OutputFanout(self._streams, fanout_per_pass)
        self._outbox = Outbox()
        self._stats = IDLE_STATISTICS
        self.histograms = EngineHistograms()  # every step's timings (engine.step_timings)
        self._leases: dict[int, SlotLease] = {}  # pixel slots of sequences sent, until read
        self._last_progress = time.monotonic()
        self._alive = False
        self._closing = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        core: Core,
        stream_interval: float = 0.0,
        device_gate: trio.CapacityLimiter | None = None,
        fanout_per_pass: int = STREAM_FANOUT,
    ) -> AsyncIterator[AsyncEngine]:
        """Run the engine on ``core`` for the duration of the block (see the module
        docstring for the lifetime and cancellation rules). Each step's outputs reach at
        most ``fanout_per_pass`` streams per scheduler pass (``OutputFanout``)."""
        engine = cls(core, stream_interval, device_gate, fanout_per_pass)
        async with trio.open_nursery() as nursery:
            engine._alive = True
            nursery.start_soon(engine._run_core)
            nursery.start_soon(engine._fanout.run)
            try:
                yield engine
            finally:
                engine._closing = True
                nursery.cancel_scope.cancel()
                engine._fanout.flush()
                engine._abort_all("the engine stopped before this request finished")

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @asynccontextmanager
    async def open_stream(
        self,
        prompt: EnginePrompt,
        params: SamplingParams,
        lease: SlotLease | None = None,
        *,
        final_only: bool = False,
    ) -> AsyncIterator[RequestStream]:
        """Submit a sequence; yield its stream of deltas (with ``final_only``, one delta
        when the sequence ends: ``RequestStream``).

        ``lease`` holds the pixel slots of ``prompt``'s images: the engine takes a hold on
        it when it submits the sequence and drops that hold exactly once: when the step
        loop reports the pixels read, when the sequence is withdrawn unsent, or when the
        step loop stops. The caller keeps its own hold.

        Raises ``RequestRejected`` for a request the engine refuses (images to a text-only
        model, an empty or too long prompt), ``RuntimeError`` if the engine is not running.
        Leaving the block before the last delta (break, exception, cancellation) aborts the
        sequence: one not yet sent is never sent; otherwise the step loop drops it from its
        queue (its images unencoded), or from the batch (freeing its cache) at its next step.
        """
        check_submittable(prompt, params, self.core.max_model_len, self.core.supports_images)
        if not self._alive or self._closing:
            raise RuntimeError("the engine is not running")
        if not self._streams:
            self._last_progress = time.monotonic()  # the stall clock starts with the work
        stream = self._streams.open(prompt, params, final_only=final_only)
        new = NewSequence(stream.seq_id, prompt, params)
        if lease is not None:
            lease.hold()
            self._leases[stream.seq_id] = lease
        self._outbox.add(new)
        try:
            yield stream
        finally:
            self._streams.close(stream)
            if not stream.finished and self._outbox.abort(new):
                self._drop_lease(stream.seq_id)  # never sent: never read

    async def _run_core(self) -> None:
        try:
            await self.core.run(self._outbox, self._deliver)
        finally:
            self._alive = False
            if not self._closing:
                logger.error("the engine stopped unexpectedly: %s", self.core.stopped_reason)
            self._fanout.flush()  # what the step loop finished before it stopped ends as it did
            self._abort_all(self.core.stopped_reason)
            # no step runs any more (``Core.run`` returns only then): nothing reads a slot
            for seq_id in list(self._leases):
                self._drop_lease(seq_id)

    def _drop_lease(self, seq_id: int) -> None:
        lease = self._leases.pop(seq_id, None)
        if lease is not None:
            lease.drop()

    def _deliver(self, outputs: StepOutputs) -> None:
        for seq_id in outputs.pixels_read:
            self._drop_lease(seq_id)
        self._stats = outputs.stats
        if outputs.timings is not None:
            self.histograms.record(outputs.timings)
        self._last_progress = time.monotonic()
        self._fanout.deliver(outputs.updates)

    def _abort_all(self, reason: str) -> None:
        """End every open stream with ``abort`` and an error (the request did not finish)."""
        for stream in self._streams.open_streams():
            stream.fail(reason)

    def is_healthy(self) -> bool:
        """False if the step loop is gone, or has had work but delivered nothing for a long time."""
        if not self._alive:
            return False
        if not self._streams:
            return True
        return time.monotonic() - self._last_progress < STALL_SECONDS

    def statistics(self) -> EngineStatistics:
        """The step loop's figures as of its last step, plus sequences not yet sent to it,
        and the device gate's tokens in use (in-thread placement)."""
        return dataclasses.replace(
            self._stats,
            waiting=self._stats.waiting + self._outbox.pending_adds,
            device_gate_borrowed=self._device_gate.borrowed_tokens if self._device_gate else 0,
        )


def open_engine(
    loaded: ModelCard,
    config: EngineConfig,
    device_gate: trio.CapacityLimiter | None = None,
    slots: SlotPool | None = None,
) -> AbstractAsyncContextManager[AsyncEngine]:
    """Run an engine for ``loaded`` with ``config``: its step loop in the engine worker
    process (which loads the same model, dtype, device and context length itself) if
    ``config.in_worker_process``, else in threads under ``device_gate`` (a new gate of one
    if not given), which needs ``loaded`` with its weights (a ``LoadedModel``; a
    ``ModelCard`` is refused with ``ValueError``). Its vision encoder reads images' pixels
    from ``slots``. Raises ``ModelLoadError`` if the worker cannot load the model."""
    if config.in_worker_process:
        from engine.worker_core import open_worker_engine

        return open_worker_engine(loaded, config, slots)
    from engine.model_loader import LoadedModel
    from engine.thread_core import ThreadCore

    if not isinstance(loaded, LoadedModel):
        raise ValueError("an engine in this process runs a model loaded with its weights (load_model)")
    gate = device_gate or trio.CapacityLimiter(1)
    view_pixels = slots.memory.view if slots is not None else None
    core = ThreadCore(loaded, config, gate, view_pixels)
    return AsyncEngine.open(core, config.stream_interval, gate, config.stream_fanout)
