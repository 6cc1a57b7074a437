"""Turn an OpenAI request into an ``EnginePrompt``: the request path's preparation stage.

For a chat request (a ``Chat``, validated once by the HTTP layer): the images are checked
against what the model and the media policy accept; the chat template is rendered and
tokenized under the tokenizer gate, while all images are resolved concurrently: fetched
asynchronously (network waits hold no CPU gate), decoded and preprocessed under the
image-prep gate, and encoded by the shared,
batched vision encoder. Repeated images come from the feature cache and skip decode,
preprocessing and encoding. Each image's placeholder token is then expanded to as many
tokens as its features. The gated work is a typed step (``vl.prep_tools``) that runs in
worker threads or prep worker processes, as the ``PrepRunner`` given decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from engine.prompt import EnginePrompt, ImageFeatures
from vl.chat_messages import Chat, ImageRef
from vl.errors import (
    InvalidRequest,
    image_token_mismatch,
    images_not_supported,
    too_many_images,
)
from vl.feature_cache import FeatureCache, FeatureCacheStatistics, image_cache_key
from vl.gates import Gate, GateStatistics
from vl.image_fetcher import FetcherStatistics, ImageFetcher
from vl.image_source import load_image_bytes
from vl.prep_tools import (
    Detokenize,
    ImagePixels,
    PrepRunner,
    PrepTools,
    RenderChat,
    ThreadPrep,
    Tokenize,
)
from vl.vision_encoder import VisionEncoder, VisionEncoderStatistics


@dataclass(frozen=True)
class PreparerStatistics:
    image_gate: GateStatistics
    tokenizer_gate: GateStatistics
    encoder: VisionEncoderStatistics | None
    feature_cache: FeatureCacheStatistics
    fetcher: FetcherStatistics


class ChatPreparer:
    def __init__(
        self,
        *,
        tools: PrepTools,
        fetcher: ImageFetcher,
        image_gate: Gate,
        tokenizer_gate: Gate,
        feature_cache: FeatureCache,
        encoder: VisionEncoder | None = None,
        image_token: str | None = None,
        runner: PrepRunner | None = None,
    ) -> None:
        """``tools`` is the server process's copy (settings, token ids); ``runner`` runs
        the gated work (default: worker threads using ``tools``)."""
        self._tools = tools
        self._policy = tools.policy
        self._fetcher = fetcher
        self.image_gate = image_gate
        self.tokenizer_gate = tokenizer_gate
        self._cache = feature_cache
        self._encoder = encoder
        self._runner = runner or ThreadPrep(tools)
        self._image_token_id = tools.tokenizer.convert_tokens_to_ids(image_token) if image_token else None

    @property
    def runner(self) -> PrepRunner:
        """Where the gated work runs."""
        return self._runner

    @property
    def supports_images(self) -> bool:
        return self._encoder is not None and self._tools.preprocessor is not None

    async def prepare_chat(self, chat: Chat) -> EnginePrompt:
        """Render, tokenize and attach image features.

        Raises ``InvalidRequest``/``MediaError`` naming the offending field: images to a
        model without a vision tower, too many images, an image that cannot be loaded, image
        tokens written in message text, a template that rejects the chat. Cancellation:
        stops at the next boundary (fetch, gate wait, worker return, encoder result);
        work already running finishes and gives its gate token back; nothing reaches
        the engine.
        """
        images = chat.images()
        self._check_images(images)
        features: list[ImageFeatures | None] = [None] * len(images)
        token_ids: list[int] = []
        errors: list[InvalidRequest] = []

        async def guarded(cancel_scope: trio.CancelScope, work) -> None:
            try:
                await work()
            except InvalidRequest as exc:
                errors.append(exc)
                cancel_scope.cancel()

        async def render() -> None:
            token_ids.extend(await self._runner.run(self.tokenizer_gate, RenderChat(chat.template_messages())))

        def resolver(i: int, ref: ImageRef):
            async def resolve() -> None:
                features[i] = await self._image_features(ref)

            return resolve

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, nursery.cancel_scope, render)
            for i, ref in enumerate(images):
                nursery.start_soon(guarded, nursery.cancel_scope, resolver(i, ref))
        if errors:
            raise errors[0]
        return EnginePrompt(self._expand_image_tokens(token_ids, features), list(features))

    async def prepare_text(self, prompt: str) -> EnginePrompt:
        """Tokenize a completions prompt (no chat template)."""
        return EnginePrompt(await self.tokenize(prompt, add_special_tokens=True))

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return await self._runner.run(self.tokenizer_gate, Tokenize(text, add_special_tokens))

    async def tokenize_chat(self, chat: Chat) -> list[int]:
        """Token ids of the rendered chat template, one placeholder token per image. Images
        are not loaded, and a text-only model counts them too; more than the policy allows
        per request is still an ``InvalidRequest``."""
        self._check_image_count(chat.images())
        return await self._runner.run(self.tokenizer_gate, RenderChat(chat.template_messages()))

    async def detokenize(self, token_ids: list[int]) -> str:
        return await self._runner.run(self.tokenizer_gate, Detokenize(token_ids))

    def _check_images(self, images: list[ImageRef]) -> None:
        """What this model and the media policy allow: any images at all, and how many."""
        if images and not self.supports_images:
            raise images_not_supported(images[0].param)
        self._check_image_count(images)

    def _check_image_count(self, images: list[ImageRef]) -> None:
        limit = self._policy.max_images_per_request
        if len(images) > limit:
            raise too_many_images(limit, len(images), images[limit].param)

    async def _image_features(self, ref: ImageRef) -> ImageFeatures:
        encoded = await load_image_bytes(ref.image.url, param=ref.param, fetcher=self._fetcher, policy=self._policy)
        # hashing releases the GIL; it needs no gate (cheap, and bounded by admission)
        key = await trio.to_thread.run_sync(image_cache_key, encoded, self._tools.preprocessor.settings_key)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        pixels = await self._runner.run(self.image_gate, ImagePixels(encoded, ref.param))
        features = await self._encoder.encode(pixels)
        self._cache.put(key, features)
        return features

    def _expand_image_tokens(self, token_ids: list[int], features: list[ImageFeatures | None]) -> list[int]:
        if self._image_token_id is None:
            return token_ids
        positions = [i for i, t in enumerate(token_ids) if t == self._image_token_id]
        if len(positions) != len(features):
            raise image_token_mismatch(len(positions), len(features))
        out: list[int] = []
        start = 0
        for pos, feat in zip(positions, features, strict=True):
            out.extend(token_ids[start:pos])
            out.extend([self._image_token_id] * feat.embeddings.shape[0])
            start = pos + 1
        out.extend(token_ids[start:])
        return out

    def statistics(self) -> PreparerStatistics:
        return PreparerStatistics(
            image_gate=self.image_gate.statistics(),
            tokenizer_gate=self.tokenizer_gate.statistics(),
            encoder=self._encoder.statistics() if self._encoder else None,
            feature_cache=self._cache.statistics(),
            fetcher=self._fetcher.statistics(),
        )
