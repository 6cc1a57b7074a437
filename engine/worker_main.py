"""Entry point of the engine worker process: ``python -m engine.worker_main FD``.

``FD`` is the worker's end of a socket pair made by the front end (``ProcessEngine``).
The first message on it is a ``WorkerConfig``; the worker loads the model, answers
``WorkerReady`` (or ``WorkerFailed`` and exits 1), then serves ``WorkerLoop`` until the
front end's end closes, which also happens when the front end dies: the worker never
outlives its parent.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys

from engine.wire import BlockingMessageSocket, WorkerConfig, WorkerFailed, WorkerReady

logger = logging.getLogger("vlserve.engine.worker")


def serve(channel: BlockingMessageSocket) -> int:
    """Load, report readiness, run the loop. Returns the process exit status."""
    (config,) = channel.receive_all(block=True)[:1] or (None,)
    if not isinstance(config, WorkerConfig):
        return 2  # the front end went away before configuring us
    try:
        loop = _build(config, channel)
    except Exception as exc:  # reported to the front end, which raises ModelLoadError
        channel.send(WorkerFailed(f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        loop.run()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the front end closed while we were sending: it is stopping us
    return 0


def _build(config: WorkerConfig, channel: BlockingMessageSocket):
    import torch

    from engine.engine_core import EngineCore
    from engine.model_loader import load_model
    from engine.scheduler import Scheduler
    from engine.worker_loop import WorkerLoop

    if config.nice:
        os.nice(config.nice)  # a lower CPU priority than the front end's event loop
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    loaded = load_model(config.model_path, dtype=config.dtype, device=config.device, max_model_len=config.max_model_len)
    scheduler = Scheduler(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)
    core = EngineCore.for_model(
        loaded,
        seed=config.seed,
        decode_steps_per_call=config.decode_steps_per_call,
        # stop back-to-back decode steps as soon as the front end has sent anything
        has_news=lambda: scheduler.num_waiting > 0 or channel.readable(),
    )
    gc.collect()
    gc.freeze()  # as in the front end: full collections skip the model's objects
    channel.send(WorkerReady(max_model_len=loaded.max_model_len, supports_images=loaded.supports_images, pid=os.getpid()))
    return WorkerLoop(core, scheduler, channel)


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: the front end decides when we stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(argv[1]))
    with sock:
        return serve(BlockingMessageSocket(sock))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
