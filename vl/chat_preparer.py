"""Turn an OpenAI request into an ``EnginePrompt``: the request path's preparation stage.

For a chat request (a ``Chat``, validated once by the HTTP layer): the images are checked
against what the model and the media policy accept; the chat template is rendered and
tokenized under the tokenizer gate, while all images are resolved concurrently: fetched
asynchronously (network waits hold no CPU gate), then each takes a free pixel slot (a
shared-memory buffer from the ``SlotPool``; none free: it waits) and is decoded and
preprocessed under the image-prep gate straight into that slot. Templates waiting for the
tokenizer gate are rendered together, one call per batch (``vl.render_batcher``). The
prompt carries each image as an ``ImageInput`` (content key, patch grid, slot); the engine's vision encoder
reads the slots and encodes the images in its own step (docs/architecture.md), caching
features by content key. Each image's placeholder token is expanded to as many tokens as
its patch grid gives. The gated work is a typed step (``vl.prep_tools``) that runs in
worker threads or prep worker processes, as the ``PrepRunner`` given decides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import trio

from engine.pixel_slots import Slot, SlotPool
from engine.prompt import EnginePrompt, ImageInput
from engine.slot_lease import SlotLease
from vl.chat_messages import Chat, ImageRef
from vl.errors import (
    InvalidRequest,
    image_token_mismatch,
    images_not_supported,
    too_many_images,
)
from vl.gates import BorrowTimes, Gate, GateStatistics
from vl.image_fetcher import FetcherStatistics, ImageFetcher
from vl.image_key import image_cache_key
from vl.image_source import EncodedImage, load_image_bytes
from vl.pixel_budget import PixelBounds, PixelRequest, image_bounds
from vl.prep_timings import PrepTimings
from vl.prep_tools import (
    Detokenize,
    ImagePixels,
    PrepRunner,
    PrepTools,
    RenderChat,
    ThreadPrep,
    Tokenize,
)
from vl.render_batcher import RenderBatcher


@dataclass(frozen=True)
class PreparerStatistics:
    image_gate: GateStatistics
    tokenizer_gate: GateStatistics
    fetcher: FetcherStatistics


@dataclass(frozen=True)
class PreparedPrompt:
    """A prepared prompt and the lease on its images' pixel slots (``None`` without
    images). Whoever prepared it holds the lease as its creator and must call
    ``lease.release_creator()`` once it has submitted the prompt's sequences, and in any
    case when its request ends; the engine takes its own holds for the sequences it
    submits."""

    prompt: EnginePrompt
    lease: SlotLease | None = None
    timings: PrepTimings | None = None  # where the preparation time went (vl.prep_timings)


class ChatPreparer:
    def __init__(
        self,
        *,
        tools: PrepTools,
        fetcher: ImageFetcher,
        image_gate: Gate,
        tokenizer_gate: Gate,
        slots: SlotPool | None = None,
        image_token: str | None = None,
        runner: PrepRunner | None = None,
        pixel_bounds: PixelBounds | None = None,
        renders: RenderBatcher | None = None,
    ) -> None:
        """``tools`` is the server process's copy (settings, token ids); ``runner`` runs
        the gated work (default: worker threads using ``tools``); ``slots`` holds images'
        pixels on their way to the engine (``None``: this preparer takes no images);
        ``pixel_bounds``: the server's bounds on an image's pixels (``vl.pixel_budget``;
        ``None``: the image processor's own, unnarrowed by ``detail`` or requests);
        ``renders`` renders chat templates in batches under ``tokenizer_gate`` (a running
        ``RenderBatcher`` on ``runner``; ``None``: each chat in a call of its own)."""
        if renders is not None and renders.gate is not tokenizer_gate:
            raise ValueError("the render batcher must hold the tokenizer gate it is given")
        self._tools = tools
        self._policy = tools.policy
        self._fetcher = fetcher
        self.image_gate = image_gate
        self.tokenizer_gate = tokenizer_gate
        self._slots = slots
        self._runner = runner or ThreadPrep(tools)
        self._renders = renders
        self._image_token_id = tools.tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        self.pixel_bounds = pixel_bounds

    @property
    def runner(self) -> PrepRunner:
        """Where the gated work runs."""
        return self._runner

    @property
    def supports_images(self) -> bool:
        return self._slots is not None and self._tools.preprocessor is not None

    async def prepare_chat(self, chat: Chat) -> PreparedPrompt:
        """Render, tokenize, and put each image's pixels into a slot of its own.

        Raises ``InvalidRequest``/``MediaError`` naming the offending field: images to a
        model without a vision tower, too many images, an image that cannot be loaded, image
        tokens written in message text, a template that rejects the chat. On success the
        caller holds the returned lease as its creator (``PreparedPrompt``). Cancellation or error: stops at the next
        boundary (fetch, slot or gate wait, worker return); work already running finishes
        and gives its gate token back; every slot taken is released; nothing reaches the
        engine.
        """
        images = chat.images()
        self._check_images(images)
        inputs: list[ImageInput | None] = [None] * len(images)
        taken: list[Slot] = []
        timings = PrepTimings()
        try:
            token_ids = await self._prepare_parts(chat, images, inputs, taken, timings)
            prompt = EnginePrompt(self._expand_image_tokens(token_ids, inputs), list(inputs))
        except BaseException:
            for slot in taken:
                slot.release()
            raise
        return PreparedPrompt(prompt, SlotLease(taken) if taken else None, timings)

    async def _prepare_parts(
        self,
        chat: Chat,
        images: list[ImageRef],
        inputs: list[ImageInput | None],
        taken: list[Slot],
        timings: PrepTimings,
    ) -> list[int]:
        """Render the template while the images are resolved: each fetched and keyed
        concurrently, then one slot for each taken in one ``acquire_many`` (a request never
        holds some slots while waiting for more), then each preprocessed into its slot
        concurrently. The first ``InvalidRequest`` cancels the rest and is raised. Slots
        taken are appended to ``taken`` as soon as they are acquired."""
        token_ids: list[int] = []
        errors: list[InvalidRequest] = []

        async def guarded(cancel_scope: trio.CancelScope, work) -> None:
            try:
                await work()
            except InvalidRequest as exc:
                errors.append(exc)
                cancel_scope.cancel()

        async def render() -> None:
            times = BorrowTimes()
            token_ids.extend(await self._render(chat, times))
            timings.gate_wait(self.tokenizer_gate.name, times.waited)
            timings.stage("tokenize", times.held)

        async def resolve_images(cancel_scope: trio.CancelScope) -> None:
            bounds = [self._bounds(ref, chat.pixels) for ref in images]
            fetched: dict[int, tuple[EncodedImage, str]] = {}

            def fetcher(i: int, ref: ImageRef):
                async def fetch() -> None:
                    fetched[i] = await self._fetch_and_key(ref, bounds[i], timings)

                return fetch

            def preparer(i: int, ref: ImageRef, slot: Slot):
                async def prepare() -> None:
                    inputs[i] = await self._image_pixels(ref, *fetched[i], bounds[i], slot, timings)

                return prepare

            async with trio.open_nursery() as fetches:
                for i, ref in enumerate(images):
                    fetches.start_soon(guarded, cancel_scope, fetcher(i, ref))
            asked = trio.current_time()
            slots = await self._slots.acquire_many(len(images))
            taken.extend(slots)
            timings.gate_wait("pixel_slots", trio.current_time() - asked)
            async with trio.open_nursery() as preps:
                for i, (ref, slot) in enumerate(zip(images, slots, strict=True)):
                    preps.start_soon(guarded, cancel_scope, preparer(i, ref, slot))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, nursery.cancel_scope, render)
            if images:
                nursery.start_soon(resolve_images, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return token_ids

    async def prepare_text(self, prompt: str) -> EnginePrompt:
        """Tokenize a completions prompt (no chat template)."""
        return EnginePrompt(await self.tokenize(prompt, add_special_tokens=True))

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return await self._runner.run(self.tokenizer_gate, Tokenize(text, add_special_tokens))

    async def tokenize_chat(self, chat: Chat) -> list[int]:
        """Token ids of the chat as ``prepare_chat`` makes them: for a vision model each
        image is loaded and preprocessed the same way (detail and pixel request included)
        and counts its real image tokens; its slot is released at once. A text-only model
        counts one placeholder token per image. More images than the policy allows per
        request is an ``InvalidRequest``; so is an image that cannot be loaded.
        Cancellation: as ``prepare_chat``."""
        images = chat.images()
        self._check_image_count(images)
        if not (images and self.supports_images):
            return await self._render(chat)
        prepared = await self.prepare_chat(chat)
        assert prepared.lease is not None  # a chat with images holds their slots
        prepared.lease.release_creator()
        return prepared.prompt.token_ids

    async def _render(self, chat: Chat, times: BorrowTimes | None = None) -> list[int]:
        """The chat's template rendered and tokenized under the tokenizer gate: batched
        with other waiting chats if this preparer has a ``RenderBatcher``."""
        if self._renders is not None:
            return await self._renders.render(chat.template_messages(), times)
        return await self._runner.run(self.tokenizer_gate, RenderChat(chat.template_messages()), times)

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

    def _bounds(self, ref: ImageRef, request: PixelRequest | None) -> PixelBounds | None:
        """The pixel bounds of one image: the server's, narrowed by its ``detail`` and the
        request (``vl.pixel_budget.image_bounds``)."""
        if self.pixel_bounds is None:
            return None
        token_pixels = self._tools.preprocessor.token_pixels
        return image_bounds(self.pixel_bounds, detail=ref.image.detail, request=request, token_pixels=token_pixels)

    async def _fetch_and_key(
        self, ref: ImageRef, bounds: PixelBounds | None, timings: PrepTimings
    ) -> tuple[EncodedImage, str]:
        """The image's bytes and content key (its preprocessing, ``bounds`` included, is part
        of the key). Each stage's time and each wait goes into ``timings``."""
        started, fetch_times = trio.current_time(), BorrowTimes()
        encoded = await load_image_bytes(
            ref.image.url, param=ref.param, fetcher=self._fetcher, policy=self._policy, times=fetch_times
        )
        timings.stage("fetch", trio.current_time() - started)
        timings.gate_wait("fetch", fetch_times.waited)  # None (not counted) unless fetched over HTTP
        settings = self._tools.preprocessor.settings_key + (f":{bounds.key}" if bounds else "")
        # hashing releases the GIL; it needs no gate (cheap, and bounded by admission)
        key = await trio.to_thread.run_sync(image_cache_key, encoded, settings)
        return encoded, key

    async def _image_pixels(
        self,
        ref: ImageRef,
        encoded: EncodedImage,
        key: str,
        bounds: PixelBounds | None,
        slot: Slot,
        timings: PrepTimings,
    ) -> ImageInput:
        """Decode and preprocess (resized within ``bounds``) into ``slot``, which the
        caller holds. Each stage's time and each wait goes into ``timings``."""
        times = BorrowTimes()
        step = ImagePixels(encoded, ref.param, slot.index, self._slots.spec, bounds)
        image = await self._runner.run(self.image_gate, step, times)
        timings.gate_wait(self.image_gate.name, times.waited)
        timings.stage("decode", image.decode_seconds)
        timings.stage("preprocess", image.preprocess_seconds)
        return ImageInput(key, image.grid_thw, image.pixels)

    def _expand_image_tokens(self, token_ids: list[int], images: list[ImageInput | None]) -> list[int]:
        if self._image_token_id is None:
            return token_ids
        positions = [i for i, t in enumerate(token_ids) if t == self._image_token_id]
        if len(positions) != len(images):
            raise image_token_mismatch(len(positions), len(images))
        merge = self._tools.preprocessor.merge_size
        out: list[int] = []
        start = 0
        for pos, image in zip(positions, images, strict=True):
            out.extend(token_ids[start:pos])
            out.extend([self._image_token_id] * (image.num_patches // merge**2))
            start = pos + 1
        out.extend(token_ids[start:])
        return out

    def statistics(self) -> PreparerStatistics:
        """The gates' figures; the tokenizer gate's ``waiting`` counts the chats queued in
        the render batcher too (they wait for that gate, in batches)."""
        tokenizer = self.tokenizer_gate.statistics()
        if self._renders is not None:
            tokenizer = dataclasses.replace(tokenizer, waiting=tokenizer.waiting + self._renders.queued)
        return PreparerStatistics(
            image_gate=self.image_gate.statistics(),
            tokenizer_gate=tokenizer,
            fetcher=self._fetcher.statistics(),
        )
