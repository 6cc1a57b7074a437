"""Images in the engine's step loop, on the real tiny model and a real pixel-slot pool:
pixels are read in their slot, encoded in the step that prefills their sequence (one batch
for every joining sequence) or ahead of it while the sequence waits, never encoded for a
sequence that is aborted first, and the slot is reported free only once its image is
encoded or dropped."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.config import EngineConfig
from engine.core_messages import NewSequence, Submit
from engine.pixel_slots import SlotPool
from engine.prompt import EnginePrompt, ImageInput
from engine.sampling_params import SamplingParams
from engine.step_loop import StepLoop
from tests.engine.configs import in_thread
from tests.engine.prompts import chat_prompt, noise_image, reference_generate

GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture
def pool(tiny_model):
    with SlotPool.create(4, 8 << 20) as pool:
        yield pool


@pytest.fixture
def loop(tiny_model, pool):
    return StepLoop.for_model(tiny_model, EngineConfig(), view_pixels=pool.memory.view)


def image_sequence(tiny_model, pool, seq_id: int, seed: int, *, key: str | None = None, params=GREEDY):
    """A new sequence whose image's pixels are in slot ``seq_id % 4``; also the same prompt
    with features computed directly and ``generate()``'s inputs, for reference."""
    reference, extra = chat_prompt(tiny_model, "describe", noise_image(seed, 64, 96))
    pixels = pool.memory.write(seq_id % 4, extra["pixel_values"])
    grid = tuple(extra["image_grid_thw"][0].tolist())
    prompt = EnginePrompt(reference.token_ids, [ImageInput(key or f"image-{seed}", grid, pixels)])
    return NewSequence(seq_id, prompt, params), (reference, extra)


def run_until_idle(loop: StepLoop) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for _ in range(100):
        if not loop.has_work():
            return tokens
        for update in loop.step().updates:
            tokens.setdefault(update.seq_id, []).extend(update.token_ids)
    raise AssertionError("the loop never went idle")


def test_joining_images_are_encoded_in_one_batch_and_generate_like_generate(tiny_model, pool, loop):
    """Three sequences arriving together: their images go through one vision forward in
    the step that prefills them, and each greedy output equals transformers' ``generate``."""
    news, references = zip(*(image_sequence(tiny_model, pool, i, seed=i) for i in range(3)), strict=True)
    first = loop.step(Submit(list(news)))
    assert sorted(first.pixels_read) == [0, 1, 2]  # every slot may be reused after this step
    stats = loop.statistics()
    assert (stats.encoder_batches, stats.encoder_largest_batch, stats.images_encoded) == (1, 3, 3)
    tokens: dict[int, list[int]] = {}
    for update in first.updates:
        tokens.setdefault(update.seq_id, []).extend(update.token_ids)
    for seq_id, more in run_until_idle(loop).items():
        tokens[seq_id] += more
    for seq_id, (reference, extra) in enumerate(references):
        assert tokens[seq_id] == reference_generate(tiny_model, reference, extra, GREEDY.max_tokens)


def test_an_aborted_sequence_s_pixels_are_never_encoded(tiny_model, pool, loop):
    """Invariant: a sequence aborted before the step that would encode its image leaves no
    trace in the encoder: the image is dropped unencoded, its slot is reported free, and
    the sequence produces no output."""
    new, _ = image_sequence(tiny_model, pool, 1, seed=1)
    loop.apply(Submit([new]))
    loop.apply(Submit(aborts=[1]))
    outputs = loop.step()
    stats = loop.statistics()
    assert outputs.pixels_read == [1] and outputs.updates == []
    assert (stats.images_encoded, stats.images_dropped, stats.images_pending) == (0, 1, 0)
    assert not loop.has_work()


def test_a_sequence_aborted_in_its_own_submit_is_never_read(tiny_model, pool, loop):
    new, _ = image_sequence(tiny_model, pool, 1, seed=1)
    outputs = loop.step(Submit([new], aborts=[1]))
    stats = loop.statistics()
    assert outputs.pixels_read == [1] and outputs.updates == []
    assert (stats.image_cache_misses, stats.images_encoded) == (0, 0)


def test_an_abort_during_the_encoding_step_lets_the_batch_finish_and_drops_the_result(tiny_model, pool, loop):
    """Invariant: an abort that arrives while the step encoding a sequence's image runs
    does not interrupt it: the batch finishes (its features are cached for others) and
    the sequence leaves at the next step without further output."""
    new, _ = image_sequence(tiny_model, pool, 1, seed=1, params=SamplingParams(max_tokens=50, temperature=0))
    other, _ = image_sequence(tiny_model, pool, 2, seed=2, params=SamplingParams(max_tokens=50, temperature=0))
    first = loop.step(Submit([new, other]))  # the step that encodes both and prefills them
    assert {u.seq_id for u in first.updates} == {1, 2}
    loop.apply(Submit(aborts=[1]))  # arrived during that step: applied after it
    after = run_until_idle(loop)
    produced = sum(len(u.token_ids) for u in first.updates if u.seq_id == 2)
    assert 1 not in after and produced + len(after[2]) == 50
    stats = loop.statistics()
    assert (stats.images_encoded, stats.encoder_batches, stats.images_dropped) == (2, 1, 0)
    assert stats.running == 0 and stats.cache_tokens == 0


def test_a_slot_is_reported_free_in_the_step_that_encodes_its_image(tiny_model, pool):
    """Invariant: a sequence waiting behind the encoder budget keeps its slot (it is not in
    ``pixels_read``) until the step that encodes its image; an overwrite of a slot after it
    was reported never reaches a forward (outputs equal ``generate``'s)."""
    first, reference_1 = image_sequence(tiny_model, pool, 1, seed=1)
    second, reference_2 = image_sequence(tiny_model, pool, 2, seed=2)
    patches = first.prompt.images[0].num_patches
    # the encoder budget of the step itself: nothing is encoded ahead of its step here
    config = EngineConfig(vision_step_patches=patches, vision_ahead=False)
    loop = StepLoop.for_model(tiny_model, config, view_pixels=pool.memory.view)
    tokens: dict[int, list[int]] = {}
    outputs = loop.step(Submit([first, second]))  # room for one image's encoding per step
    assert outputs.pixels_read == [1] and loop.statistics().images_encoded == 1
    pool.memory.write(1, torch.full_like(pool.memory.read(first.prompt.images[0].pixels), float("nan")))
    for update in outputs.updates:
        tokens.setdefault(update.seq_id, []).extend(update.token_ids)
    outputs = loop.step()
    assert outputs.pixels_read == [2] and loop.statistics().images_encoded == 2
    for update in outputs.updates:
        tokens.setdefault(update.seq_id, []).extend(update.token_ids)
    for seq_id, more in run_until_idle(loop).items():
        tokens[seq_id] += more
    for seq_id, (reference, extra) in ((1, reference_1), (2, reference_2)):
        assert tokens[seq_id] == reference_generate(tiny_model, reference, extra, GREEDY.max_tokens)


def test_images_encoded_ahead_while_their_sequences_wait_generate_like_generate(tiny_model, pool):
    """With room for one image's encoding per step, the images of the sequences left
    waiting go to the encoder's ahead thread during the first step; the later steps find
    them encoded (no forward of their own), every slot is reported once, and each greedy
    output equals transformers' ``generate``."""
    news, references = zip(*(image_sequence(tiny_model, pool, i, seed=i) for i in range(3)), strict=True)
    patches = news[0].prompt.images[0].num_patches
    loop = StepLoop.for_model(tiny_model, EngineConfig(vision_step_patches=patches), view_pixels=pool.memory.view)
    try:
        tokens: dict[int, list[int]] = {}
        outputs = loop.step(Submit(list(news)))
        loop._core.encoder.finish_ahead()  # the ahead thread's forward over 1's and 2's images
        stats = loop.statistics()
        assert (stats.images_encoded, stats.images_encoded_ahead, stats.encoder_batches) == (3, 2, 2)
        read = list(outputs.pixels_read)
        for update in outputs.updates:
            tokens.setdefault(update.seq_id, []).extend(update.token_ids)
        while loop.has_work():
            outputs = loop.step()
            read += outputs.pixels_read
            for update in outputs.updates:
                tokens.setdefault(update.seq_id, []).extend(update.token_ids)
        assert sorted(read) == [0, 1, 2] and loop.statistics().encoder_batches == 2
        for seq_id, (reference, extra) in enumerate(references):
            assert tokens[seq_id] == reference_generate(tiny_model, reference, extra, GREEDY.max_tokens)
    finally:
        loop.close()


def test_a_sequence_aborted_while_the_ahead_thread_encodes_its_image_keeps_the_loop_busy_until_its_slot_is_free(
    tiny_model, pool
):
    """Invariant: a waiting sequence aborted while the ahead thread runs the forward over its
    image gets no output, its slot is not reported while that forward reads it, and the
    loop keeps counting it as work (so the worker keeps stepping) until the forward ends
    and the slot is reported."""
    first, _ = image_sequence(tiny_model, pool, 0, seed=0)
    second, _ = image_sequence(tiny_model, pool, 1, seed=1)
    patches = first.prompt.images[0].num_patches
    loop = StepLoop.for_model(tiny_model, EngineConfig(vision_step_patches=patches), view_pixels=pool.memory.view)
    encoder = loop._core.encoder
    tower, started, release = encoder._encode_fn, threading.Event(), threading.Event()

    def held_on_the_ahead_thread(pixel_values, grids):
        if threading.current_thread().name.startswith("vision-ahead"):
            started.set()
            assert release.wait(10)
        return tower(pixel_values, grids)

    encoder._encode_fn = held_on_the_ahead_thread
    try:
        outputs = loop.step(Submit([first, second]))  # 0 joins; 1's image goes ahead, held
        assert started.wait(10)
        read = list(outputs.pixels_read)
        loop.apply(Submit(aborts=[1]))
        while loop._scheduler.has_work():
            outputs = loop.step()
            read += outputs.pixels_read
            assert all(u.seq_id == 0 for u in outputs.updates)
        assert read == [0] and loop.has_work()
        threading.Timer(0.05, release.set).start()
        outputs = loop.step()  # waits for the forward, then reports its slot
        assert outputs.pixels_read == [1] and outputs.updates == []
        assert not loop.has_work()
        stats = loop.statistics()
        assert (stats.images_encoded, stats.images_encoded_ahead, stats.images_pending) == (2, 1, 0)
    finally:
        release.set()
        loop.close()


def test_the_engine_in_a_thread_of_the_server_encodes_nothing_ahead(tiny_model, pool):
    """``--no-engine-process``: no ahead thread (it would hold the event loop's GIL), so
    every image is encoded in the step that prefills its sequence."""
    news = [image_sequence(tiny_model, pool, i, seed=i)[0] for i in range(3)]
    patches = news[0].prompt.images[0].num_patches
    config = in_thread(vision_step_patches=patches)
    assert config.vision_ahead
    loop = StepLoop.for_model(tiny_model, config, view_pixels=pool.memory.view)
    loop.step(Submit(news))
    run_until_idle(loop)
    stats = loop.statistics()
    assert (stats.images_encoded, stats.images_encoded_ahead, stats.encoder_batches) == (3, 0, 3)


def test_one_picture_in_two_sequences_is_read_and_encoded_once(tiny_model, pool, loop):
    a, _ = image_sequence(tiny_model, pool, 1, seed=7, key="same")
    b, _ = image_sequence(tiny_model, pool, 2, seed=7, key="same")
    loop.step(Submit([a, b]))
    run_until_idle(loop)
    c, _ = image_sequence(tiny_model, pool, 3, seed=7, key="same")
    loop.step(Submit([c]))
    run_until_idle(loop)
    stats = loop.statistics()
    assert stats.images_encoded == 1
    assert (stats.image_cache_misses, stats.image_cache_hits) == (2, 1)


def test_a_failing_vision_forward_fails_only_its_sequence(tiny_model, pool, loop, monkeypatch):
    """An image whose encoding raises fails its own sequence (``abort`` with the error);
    a text sequence in the same step and later image sequences go on."""
    encoder = loop._core.encoder
    real = encoder._encode_fn
    calls = []

    def failing_once(pixel_values, grids):
        calls.append(len(grids))
        if len(calls) == 1:  # the step's one image: a batch of one is not retried
            raise RuntimeError("the vision tower broke")
        return real(pixel_values, grids)

    monkeypatch.setattr(encoder, "_encode_fn", failing_once)
    bad, _ = image_sequence(tiny_model, pool, 1, seed=1)
    text = NewSequence(2, EnginePrompt(tiny_model.tokenizer("hello there").input_ids), GREEDY)
    outputs = loop.step(Submit([bad, text]))
    [failure] = [u for u in outputs.updates if u.seq_id == 1]
    assert failure.finish_reason == "abort" and "the vision tower broke" in failure.error
    produced = sum(len(u.token_ids) for u in outputs.updates if u.seq_id == 2)
    assert produced + len(run_until_idle(loop).get(2, [])) == GREEDY.max_tokens
    good, _ = image_sequence(tiny_model, pool, 3, seed=3)
    outputs = loop.step(Submit([good]))
    produced = sum(len(u.token_ids) for u in outputs.updates if u.seq_id == 3)
    assert produced + len(run_until_idle(loop).get(3, [])) == GREEDY.max_tokens
