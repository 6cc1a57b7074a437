"""PR #4570's layout: ``main`` plus executors and locks for prompt and encoder work.

Prompt rendering and tokenization move to the default executor under a prompt
``asyncio.Lock``; every encoder-executor submission (preprocess, forward, and the prompt
wrapping the PR moved there) goes through an encoder ``asyncio.Lock``. Both use the PR's
shielded helper (``run_gated``), so a cancelled caller keeps the lock until its work ends.
Image fetch and decode stay in the default thread pool, ungated, as in the PR.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from bench.baselines.executor_gate import run_gated
from bench.baselines.image_loading import ImageLoader
from bench.baselines.main_style import MainStylePreparer
from engine.model_loader import LoadedModel

T = TypeVar("T")


class PrStylePreparer(MainStylePreparer):
    def __init__(self, loaded: LoadedModel, loader: ImageLoader) -> None:
        super().__init__(loaded, loader)
        self._prompt_lock = asyncio.Lock()
        self._encoder_lock = asyncio.Lock()

    async def encoder_call(self, fn: Callable[..., T], *args) -> T:
        """Vision work in the encoder executor under the encoder lock (cancellation: ``run_gated``)."""
        return await run_gated(self._encoder_lock, self.encoder_executor, fn, *args)

    async def prompt_call(self, fn: Callable[..., T], *args) -> T:
        """Prompt work in the default executor under the prompt lock (cancellation: ``run_gated``)."""
        return await run_gated(self._prompt_lock, None, fn, *args)

    async def wrap_call(self, fn: Callable[..., T], *args) -> T:
        """Prompt wrapping in the encoder executor under the encoder lock, as the PR moved it."""
        return await run_gated(self._encoder_lock, self.encoder_executor, fn, *args)
