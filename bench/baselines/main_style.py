"""LMDeploy ``main``'s request preparation layout.

Per request, in order: every image is fetched and decoded in the event loop's default thread
pool (concurrently); the request's images are preprocessed, then encoded in one forward, in
the vision encoder's one-thread executor; then the chat template is rendered and tokenized
and image tokens expanded *on the event loop*. Executor submissions are not gated: under a
burst the encoder executor's (unbounded) work queue holds every waiting request's work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from bench.baselines.image_loading import ImageLoader
from bench.baselines.prompt_text import expand_image_tokens, render_and_tokenize
from engine.model_loader import LoadedModel
from engine.prompt import EnginePrompt, ImageFeatures
from server.request_body import parse_chat
from vl.errors import images_not_supported, too_many_images
from vl.image_pixels import ImagePreprocessor, PixelInputs

T = TypeVar("T")
IMAGE_TOKEN = "<|image_pad|>"
MAX_IMAGES = 8


class MainStylePreparer:
    def __init__(self, loaded: LoadedModel, loader: ImageLoader) -> None:
        self._tokenizer = loaded.tokenizer
        self._adapter = loaded.adapter
        self._loader = loader
        self._supports_images = loaded.supports_images
        self._preprocessor = (
            ImagePreprocessor(loaded.image_processor, loaded.adapter.spatial_merge_size)
            if loaded.supports_images
            else None
        )
        self._image_token_id = self._tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if loaded.supports_images else None
        self.encoder_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision")

    async def prepare(self, messages: Any) -> EnginePrompt:
        """Validate ``messages`` and build the engine prompt. Raises ``InvalidRequest``.

        Cancellation: raises ``CancelledError`` at the next await; work already submitted to
        an executor runs to completion and its result is dropped.
        """
        chat = parse_chat(messages)
        refs = chat.images()
        if refs and not self._supports_images:
            raise images_not_supported(refs[0].param)
        if len(refs) > MAX_IMAGES:
            raise too_many_images(MAX_IMAGES, len(refs), refs[MAX_IMAGES].param)
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(
            *(loop.run_in_executor(None, self._loader.load, r.image.url, r.param) for r in refs)
        )
        features: list[ImageFeatures] = []
        if images:
            pixels = await self.encoder_call(self._preprocess, images)
            features = await self.encoder_call(self._encode, pixels)
        token_ids = await self.prompt_call(render_and_tokenize, self._tokenizer, chat.template_messages())
        if features:
            counts = [f.embeddings.shape[0] for f in features]
            token_ids = await self.wrap_call(expand_image_tokens, token_ids, self._image_token_id, counts)
        return EnginePrompt(token_ids, features)

    # The three places where the layouts differ -------------------------------------------

    async def encoder_call(self, fn: Callable[..., T], *args) -> T:
        """Vision work: straight into the one-thread encoder executor.

        Cancellation: the caller gets ``CancelledError`` at once; the submitted work still
        runs (an executor cannot stop it) and holds the executor until it ends.
        """
        return await asyncio.get_running_loop().run_in_executor(self.encoder_executor, fn, *args)

    async def prompt_call(self, fn: Callable[..., T], *args) -> T:
        """Prompt work: on the event loop (blocks it; nothing to cancel)."""
        return fn(*args)

    async def wrap_call(self, fn: Callable[..., T], *args) -> T:
        """Wrapping the prompt for the engine: on the event loop (blocks it; nothing to cancel)."""
        return fn(*args)

    # Executor functions ------------------------------------------------------------------

    def _preprocess(self, images: list) -> list[PixelInputs]:
        return [self._preprocessor(image) for image in images]

    def _encode(self, pixels: list[PixelInputs]) -> list[ImageFeatures]:
        """One vision forward for this request's images (no batching across requests)."""
        with torch.inference_mode():
            values = torch.cat([torch.as_tensor(p.pixel_values) for p in pixels])
            return self._adapter.encode_images(values, [p.grid_thw for p in pixels])

    def close(self) -> None:
        self.encoder_executor.shutdown(wait=True)
