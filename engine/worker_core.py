"""The step loop in the engine worker process, seen from the front end's event loop.

``WorkerCore.start(model_path, config)`` starts ``python -m engine.worker_main`` with one
end of a socket pair, sends it a ``WorkerStart`` and waits until it has loaded the model.
``run`` then sends the outbox's submits and receives step outputs. The scheduler, model,
sampler and detokenizer all live in the worker, so the front end's GIL is left to HTTP,
preparation and the vision encoder, and the step loop never waits for a busy event loop.

Leaving ``start`` closes the socket (the worker exits at its next read) and waits for the
process, killing it after ``STOP_SECONDS``: the worker never outlives the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core_messages import StepOutputs, WorkerFailed, WorkerReady, WorkerStart
from engine.errors import ModelLoadError
from engine.malloc_tunables import merged_tunables
from engine.outbox import Outbox
from engine.wire import MessageReceiver, encode

if TYPE_CHECKING:
    from engine.model_card import ModelCard
    from engine.pixel_slots import SlotPool, SlotSpec

logger = logging.getLogger("vlserve.engine")

STOP_SECONDS = 10.0


def worker_environment(environ: Mapping[str, str], config: EngineConfig) -> dict[str, str]:
    """The worker process's environment: ``environ`` with ``config.malloc_tunables`` added to
    its ``GLIBC_TUNABLES`` and ``OMP_WAIT_POLICY=PASSIVE`` unless ``environ`` chooses one (a
    setting the environment already makes is kept). Passive: an OpenMP thread waiting for
    work sleeps instead of spinning, so a forward on more threads (``LargeImageThreads``)
    burns no CPU while a partner thread waits for a core the front end holds."""
    env = dict(environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tunables = merged_tunables(environ.get("GLIBC_TUNABLES", ""), config.malloc_tunables)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    return env


class WorkerCore:
    """A ``Core`` (``engine.async_engine``) whose step loop runs in the worker process."""

    stopped_reason = "the engine worker process exited"

    def __init__(
        self,
        process: trio.Process,
        stream: trio.SocketStream,
        receiver: MessageReceiver,
        ready: WorkerReady,
    ):
        self._process = process
        self._stream = stream
        self._receiver = receiver
        self.max_model_len = ready.max_model_len
        self.supports_images = ready.supports_images

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exit_status(self) -> int | None:
        """The worker's exit status once it has been reaped, else ``None``."""
        return self._process.returncode

    @classmethod
    @asynccontextmanager
    async def start(
        cls, model_path: str, config: EngineConfig, slots: SlotSpec | None = None
    ) -> AsyncIterator[WorkerCore]:
        """Start the worker and wait until it has loaded the model (and attached to the
        pixel ``slots``, if given); stop it on exit.

        Raises ``ModelLoadError`` if the worker cannot load the model. Cancellation while
        the worker starts kills it; the process is always reaped.
        """
        parent_end, worker_end = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "engine.worker_main", str(worker_end.fileno())],
                pass_fds=(worker_end.fileno(),),
                env=worker_environment(os.environ, config),
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            worker_end.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_end))
        try:
            receiver = MessageReceiver(stream)
            ready = await _handshake(stream, receiver, WorkerStart(model_path, config, slots), process)
            yield cls(process, stream, receiver, ready)
        finally:
            with trio.CancelScope(shield=True):
                await _stop_worker(process, stream)

    async def run(self, outbox: Outbox, deliver: Callable[[StepOutputs], None]) -> None:
        """Send submits and receive outputs until cancelled or the worker is gone.

        Cancellation: safe; the worker stops when ``start``'s block closes the socket.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, outbox)
            await self._receive_loop(deliver)
            nursery.cancel_scope.cancel()

    async def _send_loop(self, outbox: Outbox) -> None:
        while True:
            await outbox.wait()
            try:
                await self._stream.send_all(encode(outbox.take()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the worker is gone; the receive loop says so

    async def _receive_loop(self, deliver: Callable[[StepOutputs], None]) -> None:
        try:
            while True:
                message = await self._receiver.receive()
                if message is None:
                    return
                if isinstance(message, StepOutputs):
                    deliver(message)
        except trio.BrokenResourceError:
            return


def worker_engine_config(loaded: ModelCard, config: EngineConfig) -> EngineConfig:
    """``config`` for a worker that loads the same dtype, device and context length as
    ``loaded``, with ``torch_threads`` 0 resolved to the CPUs minus one (at least one) and
    ``encoder_threads`` 0 to every CPU, or to one if the encoder encodes ahead (its thread is
    the encoder's second core: forwards split over OpenMP threads beside it would wait at
    barriers for a core it holds)."""
    return dataclasses.replace(
        config,
        dtype=loaded.dtype_name,
        device=str(loaded.device),
        max_model_len=loaded.max_model_len,
        torch_threads=config.torch_threads or max(1, (os.cpu_count() or 1) - 1),
        encoder_threads=config.encoder_threads
        or (1 if config.encodes_ahead(loaded.device_type) else os.cpu_count() or 1),
    )


@asynccontextmanager
async def open_worker_engine(
    loaded: ModelCard, config: EngineConfig, slots: SlotPool | None = None
) -> AsyncIterator[AsyncEngine]:
    """An ``AsyncEngine`` whose step loop runs in a worker process that loads ``loaded``'s
    model directory (see ``worker_engine_config``) and reads images from ``slots``."""
    spec = slots.spec if slots is not None else None
    async with (
        WorkerCore.start(str(loaded.path), worker_engine_config(loaded, config), spec) as core,
        AsyncEngine.open(core, config.stream_interval, fanout_per_pass=config.stream_fanout) as engine,
    ):
        yield engine


async def _handshake(
    stream: trio.SocketStream,
    receiver: MessageReceiver,
    start: WorkerStart,
    process: trio.Process,
) -> WorkerReady:
    """Send the start message; wait until the worker has loaded the model."""
    try:
        await stream.send_all(encode(start))
        reply = await receiver.receive()
    except trio.BrokenResourceError:
        reply = None
    if isinstance(reply, WorkerReady):
        return reply
    if isinstance(reply, WorkerFailed):
        raise ModelLoadError(f"the engine worker could not load {start.model_path}: {reply.message}")
    raise ModelLoadError(f"the engine worker (pid {process.pid}) exited during start-up")


async def _stop_worker(process: trio.Process, stream: trio.SocketStream) -> None:
    """Close our end (the worker exits at its next read) and wait; kill after STOP_SECONDS.
    Run shielded: the process is always reaped."""
    await stream.aclose()
    with trio.move_on_after(STOP_SECONDS):
        await process.wait()
        return
    logger.warning(
        "the engine worker (pid %d) did not stop in %.0f s; killing it",
        process.pid,
        STOP_SECONDS,
    )
    process.kill()
    await process.wait()
