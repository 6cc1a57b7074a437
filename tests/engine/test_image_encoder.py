"""The engine's vision encoder (``engine.image_encoder``): batching, sharing, caching and
what happens to images whose sequences leave, with a fake vision tower and fake slots."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from engine.image_encoder import ImageEncoder, ImageEncodingFailed, LargeImageThreads
from engine.prompt import ImageFeatures, ImageInput

PATCH_VALUES = 6


@dataclass(frozen=True)
class FakePixels:
    """Stands in for ``SlotPixels``: which fake slot, and the value its patches hold."""

    index: int
    value: float


class FakeTower:
    """Features = the mean of each image's patches, one row per image; records batches."""

    def __init__(self, fail_on: set[float] = frozenset()) -> None:
        self.batches: list[list[float]] = []
        self.fail_on = fail_on

    def __call__(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[ImageFeatures]:
        sizes = [t * h * w for t, h, w in grids]
        chunks = torch.split(pixel_values, sizes)
        values = [float(chunk[0, 0]) for chunk in chunks]
        self.batches.append(values)
        if self.fail_on & set(values):
            raise ValueError("a bad image")
        return [ImageFeatures(chunk.mean(dim=0, keepdim=True), g) for chunk, g in zip(chunks, grids, strict=True)]


class FakeSlots:
    def __init__(self) -> None:
        self.reads: list[int] = []

    def view(self, pixels: FakePixels) -> torch.Tensor:
        self.reads.append(pixels.index)
        return torch.full((4, PATCH_VALUES), pixels.value)


def image(value: float, *, key: str | None = None, index: int = 0) -> ImageInput:
    return ImageInput(key or f"k{value}", (1, 2, 2), FakePixels(index, value))


def make(tower=None, **options):
    tower = tower or FakeTower()
    slots = FakeSlots()
    return ImageEncoder(tower, slots.view, **options), tower, slots


def test_images_of_joining_sequences_are_encoded_in_one_batch_and_reach_each_sequence():
    encoder, tower, slots = make()
    encoder.admit(1, [image(1.0, index=0), image(2.0, index=1)])
    encoder.admit(2, [image(3.0, index=2)])
    assert slots.reads == [0, 1, 2]  # viewed in their slots on arrival
    assert encoder.patches_to_encode(1) == 8 and encoder.patches_to_encode(2) == 4
    assert encoder.encode([1, 2]) == {}
    assert tower.batches == [[1.0, 2.0, 3.0]]
    assert [float(f.embeddings[0, 0]) for f in encoder.features(1)] == [1.0, 2.0]
    assert [float(f.embeddings[0, 0]) for f in encoder.features(2)] == [3.0]
    assert encoder.patches_to_encode(1) == 0


def test_batches_respect_image_and_patch_limits():
    encoder, tower, _ = make(max_batch_images=2, max_batch_patches=10)
    for i in range(5):
        encoder.admit(i, [image(float(i))])
    encoder.encode(range(5))
    # 4 patches each: at most 2 images (8 patches) per forward
    assert tower.batches == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    assert encoder.statistics().images_encoded == 5


def test_a_key_is_read_and_encoded_once_while_shared_and_then_cached():
    encoder, tower, slots = make()
    encoder.admit(1, [image(1.0, key="same", index=0)])
    encoder.admit(2, [image(1.0, key="same", index=1)])  # another request, same picture
    assert slots.reads == [0]
    encoder.encode([1, 2])
    assert tower.batches == [[1.0]]
    encoder.release(1)
    encoder.release(2)
    encoder.admit(3, [image(1.0, key="same", index=2)])
    assert slots.reads == [0] and encoder.patches_to_encode(3) == 0
    assert float(encoder.features(3)[0].embeddings[0, 0]) == 1.0
    stats = encoder.statistics()
    assert (stats.cache_hits, stats.cache_misses, stats.cache_entries) == (1, 2, 1)


def test_pixels_released_before_their_step_are_never_encoded():
    """Invariant: an image whose every sequence left (aborted) before the step that would
    encode it is dropped unencoded, and holds no pixels afterwards."""
    encoder, tower, _ = make()
    encoder.admit(1, [image(1.0)])
    encoder.admit(2, [image(2.0)])
    encoder.release(1)
    encoder.encode([2])
    assert tower.batches == [[2.0]]
    stats = encoder.statistics()
    assert (stats.images_encoded, stats.images_dropped, stats.pending_images) == (1, 1, 0)


def test_a_shared_image_survives_one_holder_leaving():
    encoder, tower, _ = make()
    encoder.admit(1, [image(1.0, key="same")])
    encoder.admit(2, [image(1.0, key="same")])
    encoder.release(1)
    encoder.encode([2])
    assert tower.batches == [[1.0]] and encoder.statistics().images_dropped == 0


def test_one_bad_image_fails_only_the_sequences_that_hold_it():
    encoder, tower, _ = make(FakeTower(fail_on={2.0}))
    encoder.admit(1, [image(1.0)])
    encoder.admit(2, [image(2.0)])
    encoder.admit(3, [image(3.0), image(2.0)])
    failures = encoder.encode([1, 2, 3])
    assert set(failures) == {2, 3} and "a bad image" in failures[2]
    assert tower.batches[0] == [1.0, 2.0, 3.0]  # then each alone
    assert sorted(map(tuple, tower.batches[1:])) == [(1.0,), (2.0,), (3.0,)]
    assert float(encoder.features(1)[0].embeddings[0, 0]) == 1.0
    with pytest.raises(ImageEncodingFailed):
        encoder.features(2)
    for seq_id in (1, 2, 3):
        encoder.release(seq_id)
    # a later request with the bad picture tries afresh rather than inheriting the failure
    encoder.admit(4, [image(2.0)])
    assert encoder.patches_to_encode(4) == 4


def test_features_given_already_pass_through_without_encoding():
    encoder, tower, slots = make()
    ready = ImageFeatures(torch.ones(1, PATCH_VALUES), (1, 2, 2))
    encoder.admit(1, [ready])
    assert encoder.encode([1]) == {} and tower.batches == [] and slots.reads == []
    assert encoder.features(1) == [ready]


def test_a_failed_read_holds_nothing():
    reads = []

    def flaky(pixels: FakePixels) -> torch.Tensor:
        reads.append(pixels.index)
        if pixels.value == 6.0:
            raise OSError("slot gone")
        return torch.full((4, PATCH_VALUES), pixels.value)

    encoder = ImageEncoder(FakeTower(), flaky)
    with pytest.raises(OSError):
        encoder.admit(2, [image(5.0, key="ok"), image(6.0)])
    assert not encoder.holds(2) and encoder.statistics().pending_images == 0
    assert encoder.take_slots_done() == [2]  # reported once, its slots read no more


def test_a_sequence_s_slots_are_reported_once_no_image_still_reads_them():
    """Invariant: the encoder reports a sequence's slots free (``take_slots_done``) only
    once every image it reads from them is encoded, failed or dropped, even when the
    sequence itself left first and another still needs the image; a sequence that brings
    nothing to read (a shared or cached key) is reported at admission."""
    encoder, _, _ = make(FakeTower(fail_on={3.0}))
    encoder.admit(1, [image(1.0, key="a", index=0), image(2.0, index=1)])
    assert encoder.take_slots_done() == []
    encoder.admit(2, [image(1.0, key="a", index=2)])  # shares 1's pending "a": reads none of its own slots
    assert encoder.take_slots_done() == [2]
    encoder.release(1)  # 2.0 is dropped unencoded, but "a" (in 1's slot) still waits for 2
    assert encoder.take_slots_done() == []
    encoder.encode([2])
    assert encoder.take_slots_done() == [1]
    encoder.release(2)
    encoder.admit(3, [image(1.0, key="a", index=3)])  # cached now
    encoder.admit(4, [image(3.0, index=4)])
    assert encoder.take_slots_done() == [3]
    assert encoder.encode([4]) != {}  # a failed forward reads the slot no more either
    assert encoder.take_slots_done() == [4]
    assert encoder.take_slots_done() == []


class ReusedSlots:
    """Slots over one tensor, as the pool's shared memory: ``view`` gives a view, and a
    slot handed back is scribbled over (NaN) at once, as its next image would overwrite it."""

    def __init__(self, count: int) -> None:
        self.memory = torch.full((count, 4, PATCH_VALUES), float("nan"))
        self.free = list(range(count))

    def fill(self, value: float) -> FakePixels | None:
        if not self.free:
            return None
        index = self.free.pop()
        self.memory[index] = value
        return FakePixels(index, value)

    def view(self, pixels: FakePixels) -> torch.Tensor:
        return self.memory[pixels.index]

    def give_back(self, index: int) -> None:
        self.memory[index] = float("nan")
        self.free.append(index)


@pytest.mark.parametrize("ahead_forwards", [0, 2])
def test_a_storm_of_arrivals_aborts_and_steps_never_encodes_a_slot_given_back(ahead_forwards):
    """Invariant: under any interleaving of arrivals (shared, cached and new keys), aborts,
    encoding steps and (with an ahead thread) forwards handed to it and running beside
    them, a slot reported free is never read again (no forward sees the NaN written into
    it on return, every feature equals its image's value), each sequence is reported
    exactly once, and nothing is left pending or running at the end."""
    import random

    rng = random.Random(11)
    slots = ReusedSlots(6)
    seen_nan: list[bool] = []

    def tower(pixel_values, grids):
        if threading.current_thread().name.startswith("vision-ahead"):
            time.sleep(0.002)  # a forward long enough for the main thread to act while it runs
        seen_nan.append(bool(torch.isnan(pixel_values).any()))
        return FakeTower()(pixel_values, grids)

    encoder = ImageEncoder(
        tower, slots.view, max_batch_images=3, cache_bytes=2 * PATCH_VALUES * 4, ahead_forwards=ahead_forwards
    )
    slots_of: dict[int, list[int]] = {}
    values_of: dict[int, list[float]] = {}
    live: list[int] = []
    reported: list[int] = []

    def collect() -> None:
        for seq_id in encoder.take_slots_done():
            assert seq_id not in reported
            reported.append(seq_id)
            for index in slots_of.pop(seq_id):
                slots.give_back(index)

    for seq_id in range(400):
        action = rng.random()
        if action < 0.5:
            pixels = [slots.fill(float(rng.randrange(8))) for _ in range(rng.randint(1, 2))]
            if None in pixels:
                for p in pixels:
                    if p is not None:
                        slots.give_back(p.index)
            else:
                slots_of[seq_id] = [p.index for p in pixels]
                values_of[seq_id] = [p.value for p in pixels]
                encoder.admit(seq_id, [ImageInput(f"k{p.value}", (1, 2, 2), p) for p in pixels])
                live.append(seq_id)
        elif action < 0.65 and live:
            encoder.release(live.pop(rng.randrange(len(live))))  # aborted while waiting
        elif action < 0.8:
            encoder.encode_ahead(live)
        elif live:
            joining = rng.sample(live, rng.randint(1, len(live)))
            assert encoder.encode(joining) == {}
            for joined in joining:
                assert [float(f.embeddings[0, 0]) for f in encoder.features(joined)] == values_of[joined]
                encoder.release(joined)
                live.remove(joined)
        collect()
    for seq_id in live:
        encoder.release(seq_id)
    encoder.close()
    collect()
    assert seen_nan and not any(seen_nan)
    assert not slots_of and sorted(reported) == sorted(values_of)  # each admitted one, once
    assert encoder.statistics().pending_images == 0 and not encoder.ahead_busy
    assert (encoder.statistics().images_encoded_ahead > 0) == bool(ahead_forwards)


class HeldTower(FakeTower):
    """A ``FakeTower`` whose forward over an image of value ``hold`` waits until released
    (at most 10 s), and says when it has started; records which thread ran each forward."""

    def __init__(self, hold: float, fail_on_ahead: set[float] = frozenset()) -> None:
        super().__init__()
        self.hold = hold
        self.fail_on_ahead = fail_on_ahead
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def __call__(self, pixel_values, grids):
        value = float(pixel_values[0, 0])
        thread = threading.current_thread().name
        self.threads.append(thread)
        if value == self.hold:
            self.started.set()
            assert self.release.wait(10), "the held forward was never released"
        if value in self.fail_on_ahead and thread.startswith("vision-ahead"):
            raise ValueError("failed on the ahead thread")
        return super().__call__(pixel_values, grids)


def ahead_encoder(tower: FakeTower, **options) -> ImageEncoder:
    return ImageEncoder(tower, FakeSlots().view, max_batch_images=1, ahead_forwards=2, **options)


def test_waiting_sequences_images_are_encoded_ahead_newest_first_and_their_step_finds_them_ready():
    """The ahead thread takes the waiting sequences' images in the order given (the step
    loop gives the newest first: ``Scheduler.waiting_newest_first``), at most
    ``ahead_forwards`` forwards at a time; a step over sequences whose images it encoded
    runs no forward of its own."""
    tower = FakeTower()
    encoder = ahead_encoder(tower)
    for i in (1, 2, 3):
        encoder.admit(i, [image(float(i))])
    encoder.encode_ahead([3, 2, 1])
    encoder.finish_ahead()
    assert tower.batches == [[3.0], [2.0]]  # two forwards at a time, from the newest
    assert encoder.take_slots_done() == [3, 2]
    encoder.encode_ahead([1])
    encoder.finish_ahead()
    assert encoder.encode([1, 2, 3]) == {} and tower.batches == [[3.0], [2.0], [1.0]]
    assert [float(encoder.features(i)[0].embeddings[0, 0]) for i in (1, 2, 3)] == [1.0, 2.0, 3.0]
    stats = encoder.statistics()
    assert (stats.images_encoded, stats.images_encoded_ahead, stats.batches) == (3, 3, 3)
    encoder.close()


def test_an_ahead_forward_not_started_is_taken_back_by_the_step_that_needs_it():
    """A step never waits behind the ahead thread for an image it has not started: the
    step encodes it itself, while the ahead thread is still inside another forward."""
    tower = HeldTower(hold=2.0)
    encoder = ahead_encoder(tower)
    encoder.admit(1, [image(1.0)])
    encoder.admit(2, [image(2.0)])
    encoder.encode_ahead([2, 1])  # 2.0 runs (held), 1.0 queued behind it
    assert tower.started.wait(10)
    assert encoder.encode([1]) == {}  # returns while 2.0 is still held
    assert tower.threads == ["vision-ahead_0", "MainThread"]
    tower.release.set()
    encoder.close()
    assert encoder.statistics().images_encoded_ahead == 1


def test_a_slot_read_by_a_running_ahead_forward_is_reported_only_after_it_finishes():
    """Invariant: when a sequence leaves while the ahead thread is running a forward over
    its image, that forward finishes and its result goes to no sequence, and the slot is
    reported free only after it (never while a forward reads it); an image whose forward
    was only queued is dropped unencoded and its slot reported at once."""
    tower = HeldTower(hold=2.0)
    encoder = ahead_encoder(tower)
    encoder.admit(1, [image(1.0)])
    encoder.admit(2, [image(2.0)])
    encoder.encode_ahead([2, 1])
    assert tower.started.wait(10)
    assert encoder.take_slots_done() == []
    encoder.release(2)  # its forward is running
    encoder.release(1)  # its forward is queued: taken back, never run
    assert encoder.take_slots_done() == [1]
    assert encoder.ahead_busy and not encoder.holds(2)
    tower.release.set()
    encoder.finish_ahead()
    assert encoder.take_slots_done() == [2]
    assert tower.batches == [[2.0]]
    stats = encoder.statistics()
    assert (stats.images_dropped, stats.images_encoded, stats.pending_images) == (1, 1, 0)
    encoder.close()


def test_an_image_whose_ahead_forward_failed_is_encoded_again_in_its_step():
    """A forward that fails on the ahead thread fails no sequence there: the image is
    encoded again by the step that needs it, on the step's thread, and never handed
    ahead again."""
    tower = HeldTower(hold=-1.0, fail_on_ahead={1.0})
    encoder = ahead_encoder(tower)
    encoder.admit(1, [image(1.0)])
    encoder.encode_ahead([1])
    encoder.finish_ahead()
    encoder.encode_ahead([1])
    assert not encoder.ahead_busy  # not handed out again
    assert encoder.take_slots_done() == []  # the slot is still needed
    assert encoder.encode([1]) == {}
    assert tower.threads == ["vision-ahead_0", "MainThread"]
    assert float(encoder.features(1)[0].embeddings[0, 0]) == 1.0
    assert encoder.take_slots_done() == [1]
    encoder.close()


def test_close_cancels_queued_forwards_waits_for_the_running_one_and_frees_every_slot():
    """After ``close()`` no forward runs, every slot read by one is reported, and
    ``encode`` still works on the caller's thread."""
    tower = HeldTower(hold=3.0)
    encoder = ahead_encoder(tower)
    for i in (1, 2, 3):
        encoder.admit(i, [image(float(i))])
    encoder.encode_ahead([3, 2, 1])
    assert tower.started.wait(10)
    encoder.release(3)
    encoder.release(2)
    threading.Timer(0.05, tower.release.set).start()
    encoder.close()
    assert not encoder.ahead_busy
    assert sorted(encoder.take_slots_done()) == [2, 3]
    assert tower.batches == [[3.0]]
    assert encoder.encode([1]) == {} and tower.threads[-1] == "MainThread"
    encoder.close()  # idempotent


def test_the_cache_is_bounded_in_bytes_least_recently_used_out():
    feature_bytes = PATCH_VALUES * 4
    encoder, _, _ = make(cache_bytes=2 * feature_bytes)
    for i in range(3):
        encoder.admit(i, [image(float(i))])
        encoder.encode([i])
        encoder.release(i)
    stats = encoder.statistics()
    assert (stats.cache_entries, stats.cache_bytes) == (2, 2 * feature_bytes)
    encoder.admit(9, [image(0.0)])  # the oldest was evicted
    assert encoder.patches_to_encode(9) == 4


def test_each_successful_forward_reports_its_images_and_seconds_once():
    """``take_batch_times``: (images, seconds) per forward since the last call, then empty;
    a failed forward (retried alone) reports only the forwards that succeeded."""
    encoder, _, _ = make(max_batch_images=2)
    for i in range(5):
        encoder.admit(i, [image(float(i))])
    encoder.encode(range(5))
    taken = encoder.take_batch_times()
    assert [images for images, _ in taken] == [2, 2, 1]
    assert all(seconds >= 0 for _, seconds in taken)
    assert encoder.take_batch_times() == ()
    failing, _, _ = make(FakeTower(fail_on={7.0}))
    failing.admit(1, [image(7.0), image(8.0)])
    failing.encode([1])
    assert [images for images, _ in failing.take_batch_times()] == [1]  # 8.0 alone, after the pair failed


def test_a_batch_of_one_image_hands_the_tower_its_pixels_without_a_copy():
    """A real-size image's pixels are 25 MiB: a batch of one gives the tower the tensor read
    from the slot itself; a batch of several is concatenated (one tensor per forward)."""
    seen: list[int] = []
    read: list[torch.Tensor] = []

    def tower(pixel_values, grids):
        seen.append(pixel_values.data_ptr())
        return FakeTower()(pixel_values, grids)

    def read_slot(pixels):
        read.append(torch.full((4, PATCH_VALUES), pixels.value))
        return read[-1]

    encoder = ImageEncoder(tower, read_slot)
    encoder.admit(1, [image(1.0)])
    encoder.encode([1])
    assert seen == [read[0].data_ptr()]
    encoder.admit(2, [image(2.0), image(3.0)])
    encoder.encode([2])
    assert seen[1] not in (read[1].data_ptr(), read[2].data_ptr())
    assert [float(f.embeddings[0, 0]) for f in encoder.features(2)] == [2.0, 3.0]


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_forward_holding_a_large_image_runs_on_more_threads_and_gives_them_back(one_torch_thread):
    """``LargeImageThreads``: a forward whose largest image reaches ``min_patches`` runs on
    ``threads`` torch threads; smaller forwards on the caller's one; the count is restored
    after each forward, a failed one included."""
    threads_seen: list[int] = []

    def tower(pixel_values, grids):
        threads_seen.append(torch.get_num_threads())
        if bool((pixel_values == 9.0).any()):
            raise ValueError("a bad image")
        return [ImageFeatures(torch.zeros(1, PATCH_VALUES), grid) for grid in grids]

    large = ImageInput("large", (1, 4, 4), FakePixels(0, 1.0))  # 16 patches
    encoder = ImageEncoder(tower, FakeSlots().view, large_image=LargeImageThreads(2, min_patches=16))
    encoder.admit(1, [image(2.0)])  # 4 patches
    encoder.encode([1])
    encoder.admit(2, [large, image(3.0)])
    encoder.encode([2])
    encoder.admit(3, [ImageInput("bad", (1, 4, 4), FakePixels(0, 9.0))])
    assert encoder.encode([3]) == {3: "vision encoding failed: ValueError: a bad image"}
    assert threads_seen == [1, 2, 2]
    assert torch.get_num_threads() == 1


def test_large_image_threads_never_lower_the_callers_count(one_torch_thread):
    torch.set_num_threads(2)
    with LargeImageThreads(1, min_patches=1).around(100):
        assert torch.get_num_threads() == 2
    with LargeImageThreads(3, min_patches=1).around(0):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2
