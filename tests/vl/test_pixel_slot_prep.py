"""Image prep writes pixels into shared-memory slots, in threads and in prep processes."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import trio

from engine.pixel_slots import MIB, SlotMemory, SlotPool, SlotSpec
from tests.engine.prompts import noise_image
from tests.vl.slot_steps import AnnounceThenImagePixels, ExitProcess
from vl.errors import PrepFailed
from vl.gates import Gate
from vl.image_pixels import ImagePreprocessor, SlotImage, max_pixel_values_bytes, slot_bytes_for
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy
from vl.prep_config import PrepConfig
from vl.prep_processes import ProcessPrep
from vl.prep_tools import ImagePixels, PrepTools, PrepToolsSpec, ThreadPrep

PARAM = "messages[0].content[0]"


def encoded(seed: int, height: int = 300, width: int = 420) -> EncodedImage:
    buf = io.BytesIO()
    noise_image(seed, height, width).save(buf, "PNG")
    return EncodedImage(payload=buf.getvalue(), base64_encoded=False, source="data")


@pytest.fixture
def spec(tiny_model_dir, tiny_model):
    return PrepToolsSpec(str(tiny_model_dir), MediaPolicy(), tiny_model.adapter.spatial_merge_size)


@pytest.fixture
def preprocessor(tiny_model, spec):
    return ImagePreprocessor(tiny_model.image_processor, spec.merge_size)


@pytest.fixture
def slot_bytes(preprocessor):
    return slot_bytes_for(preprocessor, PrepConfig())


def tools_for(tiny_model, spec, preprocessor, pool: SlotPool | None = None) -> PrepTools:
    memories = [] if pool is None else [pool.memory]
    return PrepTools(tiny_model.tokenizer, spec.policy, preprocessor, slot_memories=memories)


def assert_same_pixels(pool: SlotPool, result: SlotImage, expected) -> None:
    assert isinstance(result, SlotImage)
    assert result.grid_thw == expected.grid_thw and result.num_patches == expected.num_patches
    assert torch.equal(pool.memory.read(result.pixels), torch.as_tensor(expected.pixel_values))


async def prepare_in_slot(pool: SlotPool, runner, gate: Gate, image: EncodedImage, check) -> None:
    """The caller's pattern: acquire a slot, run the step, read, release on every path."""
    slot = await pool.acquire()
    try:
        result = await runner.run(gate, ImagePixels(image, PARAM, slot.index, pool.spec))
        check(result)
    finally:
        slot.release()


# Sizing ----------------------------------------------------------------------------------------


def test_slots_are_sized_for_the_largest_image_the_processor_makes(tiny_model, preprocessor):
    """The tiny model's processor makes at most 1024 patches of 3x2x14x14 float32 values:
    4.6 MB, so 5 MiB slots for its own output; the fast path stores each patch's frame
    once (3x14x14 values: 2.3 MB, so 3 MiB slots); a large square image reaches that bound
    exactly."""
    assert max_pixel_values_bytes(tiny_model.image_processor) == 1024 * 3 * 2 * 14 * 14 * 4
    largest = max_pixel_values_bytes(tiny_model.image_processor, frames=1)
    assert largest == 1024 * 3 * 14 * 14 * 4
    assert preprocessor.max_pixel_values_bytes == largest
    assert slot_bytes_for(preprocessor, PrepConfig()) == 3 * MIB
    assert slot_bytes_for(tiny_model.image_processor, PrepConfig()) == 5 * MIB
    assert slot_bytes_for(preprocessor, PrepConfig(pixel_slot_mb=2)) == 2 * MIB
    for height, width in ((1400, 1400), (300, 2000), (900, 640)):
        pixels = preprocessor(noise_image(0, height, width)).pixel_values
        assert pixels.nbytes <= largest
    square = preprocessor(noise_image(0, 1400, 1400)).pixel_values
    assert square.nbytes == largest


def test_a_processor_without_size_settings_needs_the_flag():
    with pytest.raises(ValueError, match="--pixel-slot-mb"):
        slot_bytes_for(object(), PrepConfig())
    assert slot_bytes_for(object(), PrepConfig(pixel_slot_mb=3)) == 3 * MIB


def test_pixel_slot_settings_are_validated():
    assert (PrepConfig().pixel_slots, PrepConfig().pixel_slot_mb) == (16, 0)
    with pytest.raises(ValueError, match="pixel_slots"):
        PrepConfig(pixel_slots=0)
    with pytest.raises(ValueError, match="pixel_slot_mb"):
        PrepConfig(pixel_slot_mb=-1)


def test_image_steps_pickle_with_their_slot():
    step = ImagePixels(encoded(1), PARAM, 3, SlotSpec("psm_x", 8, MIB))
    assert pickle.loads(pickle.dumps(step)) == step


# In threads ------------------------------------------------------------------------------------


async def test_thread_prep_writes_the_pixels_decode_and_preprocess_gives(tiny_model, spec, preprocessor, slot_bytes):
    """Through ``ThreadPrep`` the step writes into the pool's own view (no second mapping)
    the same pixels ``decode_and_preprocess`` returns; every slot is free afterwards."""
    gate = Gate("image_prep", 2)
    with SlotPool.create(2, slot_bytes) as pool:
        tools = tools_for(tiny_model, spec, preprocessor, pool)
        assert tools.slot_memory(pool.spec) is pool.memory
        runner = ThreadPrep(tools)
        async with trio.open_nursery() as nursery:
            for seed in range(4):  # more images than slots: the last two wait for a slot
                image = encoded(seed, 200 + 40 * seed, 300)
                expected = tools.decode_and_preprocess(image, PARAM)
                nursery.start_soon(
                    prepare_in_slot, pool, runner, gate, image, lambda r, e=expected: assert_same_pixels(pool, r, e)
                )
        stats = pool.statistics()
        assert (stats.free, stats.waiting, stats.acquired) == (2, 0, 4)
    assert gate.statistics().completed == 4  # one step per image ran under the gate


def test_tools_attach_once_per_pool(tiny_model, spec, preprocessor):
    with SlotPool.create(1, MIB) as pool:
        tools = tools_for(tiny_model, spec, preprocessor)  # not given the pool's view
        memory = tools.slot_memory(pool.spec)
        assert isinstance(memory, SlotMemory) and memory is not pool.memory
        assert tools.slot_memory(pool.spec) is memory
        memory.close()


# In prep processes -----------------------------------------------------------------------------


async def test_process_prep_writes_pixels_and_a_dead_process_fails_only_its_call(
    tiny_model, spec, preprocessor, slot_bytes
):
    """Through ``ProcessPrep`` the step writes the pixels ``decode_and_preprocess`` gives
    into the slot and returns a small ``SlotImage``. A step that kills its process fails
    that call alone with ``PrepFailed``; the next image on the same runner succeeds, and
    every slot and gate token is back at the end."""
    local = tools_for(tiny_model, spec, preprocessor)
    gate = Gate("image_prep", 1)
    with SlotPool.create(2, slot_bytes) as pool:
        async with ProcessPrep.open(spec, workers=1) as processes:
            for seed in (1, 2):
                image = encoded(seed)
                expected = local.decode_and_preprocess(image, PARAM)
                await prepare_in_slot(
                    pool, processes, gate, image, lambda r, e=expected: assert_same_pixels(pool, r, e)
                )
            slot = await pool.acquire()
            try:
                result = await processes.run(gate, ImagePixels(encoded(3), PARAM, slot.index, pool.spec))
                assert len(pickle.dumps(result)) < 1024  # what came through the pipe
            finally:
                slot.release()

            with pytest.raises(PrepFailed, match="exit status 3"):
                await processes.run(gate, ExitProcess(3))
            image = encoded(4)
            expected = local.decode_and_preprocess(image, PARAM)
            await prepare_in_slot(pool, processes, gate, image, lambda r: assert_same_pixels(pool, r, expected))
            assert processes.worker_count() == 1
        assert pool.statistics().free == 2
    assert gate.statistics().borrowed == 0


async def test_a_cancelled_caller_gives_its_slot_back_only_after_the_process_wrote(tmp_path, spec, slot_bytes):
    """Invariant: a caller cancelled while its image step runs in a prep process keeps its
    slot until the process has returned (no one else can be handed a slot still being
    written), then its ``finally`` releases it: the pool ends with every slot free."""
    gate = Gate("image_prep", 1)
    started, release = tmp_path / "started", tmp_path / "release"
    scope = trio.CancelScope()
    finished = trio.Event()

    async def caller(pool: SlotPool) -> None:
        with scope:
            slot = await pool.acquire()
            try:
                step = AnnounceThenImagePixels(
                    str(started), str(release), ImagePixels(encoded(5), PARAM, slot.index, pool.spec)
                )
                await processes.run(gate, step)
                await trio.sleep_forever()
            finally:
                slot.release()
                finished.set()

    with SlotPool.create(1, slot_bytes) as pool:
        async with ProcessPrep.open(spec, workers=1) as processes:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller, pool)
                with trio.fail_after(60):
                    while not started.exists():
                        await trio.sleep(0.01)
                scope.cancel()
                await trio.sleep(0.2)  # the process is still waiting for ``release``
                assert not finished.is_set()
                assert pool.statistics().free == 0
                release.touch()
                await finished.wait()
        assert scope.cancelled_caught
        assert pool.statistics().free == 1 and gate.statistics().borrowed == 0
