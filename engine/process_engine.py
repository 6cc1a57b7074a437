"""The engine in a worker process, seen from the front end's event loop.

``ProcessEngine.open(config)`` starts ``python -m engine.worker_main`` with one end of a
socket pair, waits for it to load the model, and runs two tasks in a nursery it owns: one
sends new sequences and aborts, one receives step outputs and hands them to each request's
``RequestStream``. The scheduler, model, sampler and detokenizer all live in the worker,
so the front end's GIL is left to HTTP, preparation and the vision encoder, and the step
loop never waits for a busy event loop. The interface is ``Engine``'s: ``open_stream``,
``max_model_len``, ``is_healthy``, ``statistics``.

Lifetime: leaving ``open`` (or its cancellation) ends every open stream with ``"abort"``,
closes the socket (the worker exits at its next read) and waits for the process, killing it
after ``STOP_SECONDS``. If the worker dies on its own, every open stream ends with
``"abort"`` and an error, ``is_healthy()`` turns false, and new streams are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from engine.engine import STALL_SECONDS
from engine.engine_core import SequenceUpdate
from engine.errors import ModelLoadError
from engine.prompt import EnginePrompt
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams
from engine.sequence import SequenceStatus
from engine.step_tally import IDLE_STATISTICS, EngineStatistics
from engine.stream_registry import StreamRegistry
from engine.submit_checks import check_submittable
from engine.wire import (
    MessageReceiver,
    NewSequence,
    StepOutputs,
    Submit,
    WorkerConfig,
    WorkerFailed,
    WorkerReady,
    encode,
)

if TYPE_CHECKING:
    from engine.model_loader import LoadedModel

logger = logging.getLogger("vlserve.engine")

STOP_SECONDS = 10.0


class ProcessEngine:
    def __init__(
        self,
        process: trio.Process,
        stream: trio.SocketStream,
        receiver: MessageReceiver,
        ready: WorkerReady,
        stream_interval: float,
    ) -> None:
        self._process = process
        self._stream = stream
        self._receiver = receiver
        self._ready = ready
        self._streams = StreamRegistry(stream_interval)
        self._pending_adds: list[NewSequence] = []
        self._pending_aborts: list[int] = []
        self._outbox_changed = trio.Event()
        self._stats = IDLE_STATISTICS
        self._last_progress = time.monotonic()
        self._alive = False
        self._closing = False

    @classmethod
    @asynccontextmanager
    async def open(cls, config: WorkerConfig, stream_interval: float = 0.0) -> AsyncIterator[ProcessEngine]:
        """Start the worker, run the engine for the duration of the block, stop the worker.

        Raises ``ModelLoadError`` if the worker cannot load the model. Cancellation while
        the worker starts kills it; see the module docstring for the rest.
        """
        parent_end, worker_end = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "engine.worker_main", str(worker_end.fileno())],
                pass_fds=(worker_end.fileno(),),
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            worker_end.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_end))
        try:
            receiver = MessageReceiver(stream)
            ready = await _handshake(stream, receiver, config, process)
            engine = cls(process, stream, receiver, ready, stream_interval)
            async with trio.open_nursery() as nursery:
                engine._alive = True
                nursery.start_soon(engine._receive_loop)
                nursery.start_soon(engine._send_loop)
                try:
                    yield engine
                finally:
                    engine._closing = True
                    nursery.cancel_scope.cancel()
                    engine._abort_all("the engine stopped before this request finished")
        finally:
            with trio.CancelScope(shield=True):
                await _stop_worker(process, stream)

    @property
    def max_model_len(self) -> int:
        return self._ready.max_model_len

    @property
    def worker_pid(self) -> int:
        return self._process.pid

    @property
    def worker_exit_status(self) -> int | None:
        """The worker's exit status once it has been reaped, else ``None``."""
        return self._process.returncode

    @asynccontextmanager
    async def open_stream(self, prompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[RequestStream]:
        """Submit a sequence to the worker; yield its stream of deltas.

        Leaving the block before the last delta (break, exception, cancellation) aborts the
        sequence: one not yet sent is never sent; otherwise the worker drops it from its
        queue, or from the batch (freeing its cache) at its next step.
        """
        check_submittable(prompt, params, self._ready.max_model_len, self._ready.supports_images)
        if not self._alive or self._closing:
            raise RuntimeError("the engine is not running")
        stream = self._streams.open(prompt, params)
        seq = stream.seq
        new = NewSequence(seq.seq_id, prompt, params)
        self._pending_adds.append(new)
        self._outbox_changed.set()
        try:
            yield stream
        finally:
            self._streams.close(stream)
            if not seq.finished:
                seq.abort_requested = True
                if any(pending is new for pending in self._pending_adds):
                    self._pending_adds = [pending for pending in self._pending_adds if pending is not new]
                else:
                    self._pending_aborts.append(seq.seq_id)
                    self._outbox_changed.set()

    async def _send_loop(self) -> None:
        while True:
            await self._outbox_changed.wait()
            self._outbox_changed = trio.Event()
            if not (self._pending_adds or self._pending_aborts):
                continue
            submit = Submit(self._pending_adds, self._pending_aborts)
            self._pending_adds, self._pending_aborts = [], []
            try:
                await self._stream.send_all(encode(submit))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the worker is gone; the receive loop says so

    async def _receive_loop(self) -> None:
        try:
            while True:
                message = await self._receiver.receive()
                if message is None:
                    break
                if isinstance(message, StepOutputs):
                    self._deliver(message)
        except trio.BrokenResourceError:
            pass
        finally:
            self._alive = False
            if not self._closing:
                logger.error("the engine worker (pid %d) exited unexpectedly", self._process.pid)
            self._abort_all("the engine worker process exited")

    def _deliver(self, outputs: StepOutputs) -> None:
        self._stats = outputs.stats
        self._last_progress = time.monotonic()
        for update in outputs.updates:
            stream = self._streams.get(update.seq_id)
            if stream is None:
                continue  # its consumer has left; the abort is on its way
            seq = stream.seq
            seq.output_ids.extend(update.token_ids)
            if update.finish_reason is not None:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = update.finish_reason
                seq.error = update.error
            stream.push(SequenceUpdate(seq, update.token_ids, update.text, update.logprobs, update.finish_reason))

    def _abort_all(self, reason: str) -> None:
        """End every open stream with ``abort`` and an error (the request did not finish)."""
        for stream in self._streams.open_streams():
            seq = stream.seq
            if not seq.finished:
                seq.error = seq.error or reason
                seq.status = SequenceStatus.FINISHED
            stream.finish("abort")

    def is_healthy(self) -> bool:
        """False if the worker died, or has had work but sent nothing for a long time."""
        if not self._alive:
            return False
        if not self._streams:
            return True
        return time.monotonic() - self._last_progress < STALL_SECONDS

    def statistics(self) -> EngineStatistics:
        """The worker's figures as of its last message, plus sequences not yet sent to it."""
        return dataclasses.replace(self._stats, waiting=self._stats.waiting + len(self._pending_adds))


async def _handshake(
    stream: trio.SocketStream, receiver: MessageReceiver, config: WorkerConfig, process: trio.Process
) -> WorkerReady:
    """Send the config; wait until the worker has loaded the model."""
    try:
        await stream.send_all(encode(config))
        reply = await receiver.receive()
    except trio.BrokenResourceError:
        reply = None
    if isinstance(reply, WorkerReady):
        return reply
    if isinstance(reply, WorkerFailed):
        raise ModelLoadError(f"the engine worker could not load {config.model_path}: {reply.message}")
    raise ModelLoadError(f"the engine worker (pid {process.pid}) exited during start-up")


async def _stop_worker(process: trio.Process, stream: trio.SocketStream) -> None:
    """Close our end (the worker exits at its next read) and wait; kill after STOP_SECONDS.
    Run shielded: the process is always reaped."""
    await stream.aclose()
    with trio.move_on_after(STOP_SECONDS):
        await process.wait()
        return
    logger.warning("the engine worker (pid %d) did not stop in %.0f s; killing it", process.pid, STOP_SECONDS)
    process.kill()
    await process.wait()


def worker_config(
    loaded: "LoadedModel",
    *,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 8192,
    seed: int | None = None,
    decode_steps_per_call: int = 1,
    torch_threads: int = 0,
    nice: int = 0,
) -> WorkerConfig:
    """A worker config that loads the same model, dtype, device and context length as
    ``loaded`` (``torch_threads`` 0 leaves torch's default; ``nice`` is added to the
    worker's CPU niceness)."""
    return WorkerConfig(
        model_path=str(loaded.path),
        dtype=str(loaded.dtype).removeprefix("torch."),
        device=str(loaded.device),
        max_model_len=loaded.max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        seed=seed,
        decode_steps_per_call=decode_steps_per_call,
        torch_threads=torch_threads,
        nice=nice,
    )
