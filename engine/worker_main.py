"""Entry point of the engine worker process: ``python -m engine.worker_main FD``.

``FD`` is the worker's end of a socket pair made by the front end (``WorkerCore``).
The first message on it is a ``WorkerStart`` (model path and ``EngineConfig``); the worker
loads the model, answers ``WorkerReady`` (or ``WorkerFailed`` and exits 1), then serves its
``StepLoop`` from a trio event loop (``engine.worker_loop``) until the front end's end
closes, which also happens when the front end dies: the worker never outlives its parent.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import trio

from engine.core_messages import WorkerFailed, WorkerReady, WorkerStart
from engine.wire import BlockingMessageSocket
from engine.worker_loop import Inbox, serve_steps

if TYPE_CHECKING:
    from engine.step_loop import StepLoop

logger = logging.getLogger("vlserve.engine.worker")


def serve(channel: BlockingMessageSocket) -> int:
    """Load, report readiness, run the loop. Returns the process exit status."""
    (start,) = channel.receive_all(block=True)[:1] or (None,)
    if not isinstance(start, WorkerStart):
        return 2  # the front end went away before configuring us
    inbox = Inbox()
    try:
        loop = _build(start, channel, inbox)
    except Exception as exc:  # reported to the front end, which raises ModelLoadError
        channel.send(WorkerFailed(f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        trio.run(serve_steps, loop, channel.detach(), inbox)
    finally:
        loop.close()
    return 0


def _build(start: WorkerStart, channel: BlockingMessageSocket, inbox: Inbox) -> StepLoop:
    import torch

    from engine.model_loader import load_model
    from engine.step_loop import StepLoop

    config = start.config
    if config.nice:
        os.nice(config.nice)  # a lower CPU priority than the front end's event loop
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    loaded = load_model(
        start.model_path,
        dtype=config.dtype,
        device=config.device,
        max_model_len=config.max_model_len,
    )
    view_pixels = None
    if start.slots is not None:
        from engine.pixel_slots import SlotMemory

        view_pixels = SlotMemory.attach(start.slots).view  # the mapping is kept for the life of the process
    # stop back-to-back decode steps as soon as the front end has sent anything
    loop = StepLoop.for_model(loaded, config, has_news=inbox.__bool__, view_pixels=view_pixels)
    gc.collect()
    gc.freeze()  # as in the front end: full collections skip the model's objects
    channel.send(
        WorkerReady(
            max_model_len=loaded.max_model_len,
            supports_images=loaded.supports_images,
            pid=os.getpid(),
        )
    )
    return loop


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: the front end decides when we stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(argv[1]))
    with sock:
        return serve(BlockingMessageSocket(sock))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
