"""Compose a running vlserve: model, pixel slots, engine (with its vision encoder), image
fetcher, preparer.

``open_runtime(config)`` owns every component's lifetime: entering it loads the model (in a
worker thread, so the event loop keeps answering ``/health``), starts each component in
a nursery it owns and warms the engine up with one short sequence (``warm_up``), reporting
each stage (``server.load_progress``); leaving it shuts them down in reverse order.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass

import trio

from engine.async_engine import AsyncEngine, open_engine
from engine.errors import ModelLoadError
from engine.model_card import ModelCard
from engine.pixel_slots import SlotPool
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from server.config import ServerConfig
from server.front_card import CardRequest, load_front_card
from server.load_progress import LoadProgress
from server.sampling_defaults import NO_DEFAULTS, SamplingDefaults, read_sampling_defaults
from vl.chat_preparer import ChatPreparer
from vl.gates import Gate
from vl.image_fetcher import ImageFetcher
from vl.image_pixels import ImagePreprocessor, load_image_preprocessor, slot_bytes_for
from vl.media_policy import MediaPolicy
from vl.pixel_budget import PixelBounds, server_bounds
from vl.prep_processes import ProcessPrep
from vl.prep_tools import PrepTools, PrepToolsSpec, ThreadPrep
from vl.render_batcher import RenderBatcher
from vl.text_tokenizer import TokenizerSnapshot

IMAGE_TOKEN = "<|image_pad|>"

logger = logging.getLogger("vlserve.runtime")


@dataclass
class Runtime:
    config: ServerConfig
    model_name: str
    created: int
    max_model_len: int
    engine: AsyncEngine
    preparer: ChatPreparer
    loaded: ModelCard  # a LoadedModel (weights and all) with the engine in this process
    device_gate: trio.CapacityLimiter
    slots: SlotPool | None = None
    sampling_defaults: SamplingDefaults = NO_DEFAULTS


async def load_configured_model(config: ServerConfig, progress: LoadProgress | None = None) -> ModelCard:
    """Load ``config.model`` (or build and load the built-in tiny model).

    With the engine in its worker process (which loads the model itself and runs the
    vision encoder), the server process builds no model and imports no torch: its
    ``ModelCard`` (tokenizer, limits, stop ids, merge size) is read in a passing child
    process (``server.front_card``), and the image processor's settings from its
    ``preprocessor_config.json`` (``load_image_preprocessor``). Otherwise the whole
    ``LoadedModel``, in a worker thread.
    Cancellation: the child is killed; a load in a thread runs to completion before
    ``Cancelled`` is raised.
    """
    engine = config.engine
    stage = progress.stage if progress is not None else lambda stage: None
    request = CardRequest(config.model, engine.dtype, engine.device, engine.max_model_len)
    if engine.in_worker_process:
        return await load_front_card(request, stage)

    def load() -> ModelCard:
        from engine.model_loader import load_model

        return load_model(
            request.model_dir(),
            dtype=request.dtype,
            device=request.device,
            max_model_len=request.max_model_len,
            progress=stage,
        )

    return await trio.to_thread.run_sync(load)


@asynccontextmanager
async def open_runtime(
    config: ServerConfig, loaded: ModelCard | None = None, progress: LoadProgress | None = None
) -> AsyncIterator[Runtime]:
    """Load (unless ``loaded`` is given), run every component, warm the engine up (one
    short greedy sequence), and yield the runtime until the block exits. ``progress``
    (default: a new ``LoadProgress``) hears each loading stage as it starts."""
    progress = progress or LoadProgress()
    if loaded is None:
        loaded = await load_configured_model(config, progress)
        _freeze_startup_objects()
    with _switch_interval(config.switch_interval):
        async with _open_components(config, loaded, progress) as runtime:
            progress.stage("warm-up")
            await warm_up(runtime.engine, loaded)
            progress.done()
            yield runtime


async def warm_up(engine: AsyncEngine, loaded: ModelCard) -> None:
    """Run one greedy token of a short text prompt through ``engine``: the first step's
    one-off costs (allocations, lazy initialization) are paid before readiness says 200.
    Raises ``ModelLoadError`` if the engine fails it. Cancellation: the sequence is
    aborted (``open_stream``)."""
    token_ids = list(loaded.tokenizer("Hello", add_special_tokens=False)["input_ids"]) or [0]
    async with engine.open_stream(EnginePrompt(token_ids), SamplingParams(max_tokens=1, temperature=0)) as stream:
        async for _ in stream:
            pass
    if stream.error is not None:
        raise ModelLoadError(f"the engine failed its warm-up sequence: {stream.error}")


def _freeze_startup_objects() -> None:
    """Move everything alive after model loading (torch, transformers, the model: about
    400k objects) out of the cyclic GC's reach, as vLLM does after start-up. Without this a
    full collection scans them all and stalls every thread, the event loop included, for
    0.2-0.4 s (measured with bench/serve.py); with it, collections scan only new objects."""
    gc.collect()
    gc.freeze()


@contextmanager
def _switch_interval(seconds: float):
    """Make GIL-holding worker threads (engine steps, prep) hand the GIL to the event loop
    at least every ``seconds`` while the runtime runs (bench/README.md: /health p99 under load)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@asynccontextmanager
async def _open_components(config: ServerConfig, loaded: ModelCard, progress: LoadProgress) -> AsyncIterator[Runtime]:
    device_gate = trio.CapacityLimiter(1)
    sampling_defaults = await trio.to_thread.run_sync(read_sampling_defaults, config.generation_config, loaded.path)
    policy = config.media
    preprocessor = await trio.to_thread.run_sync(_preprocessor, loaded)
    pixel_bounds = _pixel_bounds(preprocessor, config, loaded.max_model_len)
    async with ImageFetcher(policy) as fetcher:
        # the slots outlive every process that reads or writes them: made first, unlinked last
        with _open_slots(preprocessor, config, pixel_bounds) as slots:
            if config.engine.in_worker_process:
                progress.stage("weights", "engine worker process")
            tools = PrepTools(loaded.tokenizer, policy, preprocessor, slot_memories=[slots.memory] if slots else ())
            tokenizer_gate = Gate("tokenizer", config.prep.tokenizer_concurrency)
            async with (
                open_engine(loaded, config.engine, device_gate, slots) as engine,
                _open_prep_runner(loaded, preprocessor, config, policy) as process_runner,
            ):
                runner = process_runner or ThreadPrep(tools)
                async with RenderBatcher.open(runner, tokenizer_gate, config.prep.render_batch_size) as renders:
                    preparer = ChatPreparer(
                        tools=tools,
                        fetcher=fetcher,
                        image_gate=Gate("image_prep", config.prep.image_prep_concurrency),
                        tokenizer_gate=tokenizer_gate,
                        slots=slots,
                        image_token=IMAGE_TOKEN if loaded.supports_images else None,
                        runner=runner,
                        pixel_bounds=pixel_bounds,
                        renders=renders,
                    )
                    yield Runtime(
                        config=config,
                        model_name=config.model_name,
                        created=int(time.time()),
                        max_model_len=loaded.max_model_len,
                        engine=engine,
                        preparer=preparer,
                        loaded=loaded,
                        device_gate=device_gate,
                        slots=slots,
                        sampling_defaults=sampling_defaults,
                    )


def _pixel_bounds(
    preprocessor: ImagePreprocessor | None, config: ServerConfig, max_model_len: int
) -> PixelBounds | None:
    """The server's bounds on an image's pixels (``vl.pixel_budget.server_bounds``);
    ``None`` for a text-only model or an image processor without pixel bounds."""
    if preprocessor is None:
        return None
    model = preprocessor.pixel_bounds
    if model is None:
        return None
    media = config.media
    return server_bounds(
        model,
        token_pixels=preprocessor.token_pixels,
        max_model_len=max_model_len,
        min_pixels=media.min_pixels,
        max_pixels=media.max_pixels,
    )


def _open_slots(preprocessor: ImagePreprocessor | None, config: ServerConfig, bounds: PixelBounds | None):
    """The pixel slots of a vision model (``config.prep.pixel_slots`` of them, each sized
    for the largest image the server's pixel bounds allow); ``None`` for a text-only model.
    Raises ``SlotPoolError`` if /dev/shm cannot hold them."""
    if preprocessor is None:
        return nullcontext(None)
    max_pixels = bounds.max_pixels if bounds else None
    return SlotPool.create(config.prep.pixel_slots, slot_bytes_for(preprocessor, config.prep, max_pixels))


@asynccontextmanager
async def _open_prep_runner(
    loaded: ModelCard, preprocessor: ImagePreprocessor | None, config: ServerConfig, policy: MediaPolicy
) -> AsyncIterator[ProcessPrep | None]:
    """Prep worker processes (one per gate token) if configured, else ``None`` (threads).

    Inside a daemonic process (plain ``hypercorn --worker-class trio``, whose workers are
    multiprocessing daemons) no child process may be started by multiprocessing, so prep
    runs in threads there, with a warning."""
    if not config.prep.processes:
        yield None
        return
    if multiprocessing.current_process().daemon:
        logger.warning(
            "prep runs in threads: this server runs in a daemonic process (e.g. a hypercorn worker), "
            "which may not start prep processes; use 'vlserve serve' to get them"
        )
        yield None
        return
    pixel_settings = preprocessor.pixel_settings if preprocessor is not None else None
    spec = PrepToolsSpec(
        str(loaded.path),
        policy,
        loaded.spatial_merge_size,
        pixel_settings,
        tokenizer=TokenizerSnapshot.of(loaded.tokenizer),  # rebuilt there without torch
    )
    prep_config = config.prep
    workers = prep_config.tokenizer_concurrency + (prep_config.image_prep_concurrency if loaded.supports_images else 0)
    async with ProcessPrep.open(
        spec, workers=workers, nice=prep_config.nice, malloc_tunables=prep_config.malloc_tunables
    ) as prep:
        yield prep


def _preprocessor(loaded: ModelCard) -> ImagePreprocessor | None:
    """The image preprocessor of a vision model (``None`` for a text model); raises
    ``ModelLoadError`` if its processor cannot be loaded."""
    if not loaded.supports_images or loaded.spatial_merge_size is None:
        return None
    return load_image_preprocessor(loaded.path, loaded.spatial_merge_size)
