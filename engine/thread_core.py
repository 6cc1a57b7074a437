"""The step loop in threads of the server process (``--no-engine-process``).

Each step (its image encoding included) is one ``trio.to_thread.run_sync`` under the
device gate: model forwards never run on the event loop and never two at once. The
thread is never abandoned (``abandon_on_cancel=False``), so a cancelled engine waits for
the step it started and the gate's token is held exactly while the step runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from engine.core_messages import StepOutputs
from engine.outbox import Outbox
from engine.step_loop import StepLoop

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.image_encoder import ViewPixels
    from engine.model_loader import LoadedModel


class ThreadCore:
    """A ``Core`` (``engine.async_engine``) that steps a ``StepLoop`` in worker threads."""

    stopped_reason = "the engine's step loop stopped"

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        device_gate: trio.CapacityLimiter,
        view_pixels: ViewPixels | None = None,
    ) -> None:
        self._loaded = loaded
        self._view_pixels = view_pixels
        self._config = config
        self._device_gate = device_gate
        self.max_model_len = loaded.max_model_len
        self.supports_images = loaded.adapter.supports_images

    async def run(self, outbox: Outbox, deliver: Callable[[StepOutputs], None]) -> None:
        """Step while there is work, else wait for the outbox; deliver each step's outputs.

        Cancellation: waits for the running step's thread, then raises ``Cancelled``.
        """
        # back-to-back decode sub-steps stop as soon as the front end has anything to send
        loop = StepLoop.for_model(self._loaded, self._config, has_news=outbox.__bool__, view_pixels=self._view_pixels)
        try:
            while True:
                if not loop.has_work():
                    await outbox.wait()
                outputs = await trio.to_thread.run_sync(loop.step, outbox.take(), limiter=self._device_gate)
                deliver(outputs)
        finally:
            loop.close()  # no ahead thread in this placement (EngineConfig.encodes_ahead): nothing to wait for
