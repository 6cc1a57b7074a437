"""The vision encoder's batching and cancellation invariants, with a fake blocking forward."""

from __future__ import annotations

import threading

import pytest
import torch
import trio
import trio.testing

from engine.prompt import ImageFeatures
from vl.image_pixels import PixelInputs
from vl.vision_encoder import VisionEncoder


class BlockingForward:
    """Stands in for the vision tower: each call blocks until released, records batches."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.entered = [threading.Event() for _ in range(8)]
        self.release = [threading.Event() for _ in range(8)]

    def __call__(self, pixel_values, grids):
        call = len(self.batches)
        self.batches.append([int(g[0]) for g in grids])
        self.entered[call].set()
        self.release[call].wait(10)
        sizes = [pixel_values.shape[0] // len(grids)] * len(grids)
        return [
            ImageFeatures(chunk.clone(), tuple(g))
            for chunk, g in zip(torch.split(pixel_values, sizes), grids, strict=True)
        ]

    def release_all(self):
        for e in self.release:
            e.set()


def pixels(tag: int) -> PixelInputs:
    return PixelInputs(torch.full((4, 3), float(tag)), (tag, 2, 2))


async def wait_entered(fake, call):
    await trio.to_thread.run_sync(fake.entered[call].wait)


async def test_cancelled_requester_does_not_break_a_running_batch():
    """Invariant: one requester of a running batch is cancelled; the batch finishes, the
    others get their own features, and the device gate is free afterwards."""
    fake = BlockingForward()
    gate = trio.CapacityLimiter(1)
    results = {}
    try:
        async with VisionEncoder.open(fake, gate, max_batch_size=8) as encoder:
            async with trio.open_nursery() as nursery:

                async def request(tag, scope_box=None):
                    with trio.CancelScope() as scope:
                        if scope_box is not None:
                            scope_box.append(scope)
                        results[tag] = await encoder.encode(pixels(tag))

                nursery.start_soon(request, 1)
                await wait_entered(fake, 0)  # batch [1] is running; the next three queue up
                box = []
                nursery.start_soon(request, 2)
                nursery.start_soon(request, 3, box)
                nursery.start_soon(request, 4)
                await trio.testing.wait_all_tasks_blocked()
                fake.release[0].set()
                await wait_entered(fake, 1)  # batch [2, 3, 4] is running
                box[0].cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert gate.borrowed_tokens == 1
                fake.release[1].set()
            stats = encoder.statistics()
    finally:
        fake.release_all()
    assert [sorted(b) for b in fake.batches] == [[1], [2, 3, 4]]
    assert sorted(results) == [1, 2, 4]
    for tag in (1, 2, 4):
        assert torch.equal(results[tag].embeddings, torch.full((4, 3), float(tag)))
    assert gate.borrowed_tokens == 0
    assert stats.batches_run == 2 and stats.images_encoded == 4


async def test_cancelled_unstarted_image_is_dropped():
    """Invariant: an image whose requester is cancelled before its batch starts is never
    encoded; the next batch holds only the live images."""
    fake = BlockingForward()
    gate = trio.CapacityLimiter(1)
    results = {}
    try:
        async with VisionEncoder.open(fake, gate) as encoder:
            async with trio.open_nursery() as nursery:

                async def request(tag):
                    results[tag] = await encoder.encode(pixels(tag))

                nursery.start_soon(request, 1)
                await wait_entered(fake, 0)
                with trio.move_on_after(0.05):
                    await encoder.encode(pixels(2))
                nursery.start_soon(request, 3)
                await trio.testing.wait_all_tasks_blocked()
                fake.release_all()
            stats = encoder.statistics()
    finally:
        fake.release_all()
    assert fake.batches == [[1], [3]]
    assert sorted(results) == [1, 3]
    assert stats.images_dropped == 1


async def test_batches_respect_size_and_patch_budget():
    """Queued images are taken in batches of at most ``max_batch_size`` images and
    ``max_batch_patches`` patches; every image is encoded exactly once."""
    fake = BlockingForward()
    fake.release_all()
    gate = trio.CapacityLimiter(1)
    holder = object()
    await gate.acquire_on_behalf_of(holder)  # hold the device so the jobs queue up
    async with VisionEncoder.open(fake, gate, max_batch_size=3, max_batch_patches=12) as encoder:
        async with trio.open_nursery() as nursery:
            for tag in (1, 2, 3, 4, 5, 6, 7):
                nursery.start_soon(encoder.encode, pixels(tag))
            await trio.testing.wait_all_tasks_blocked()
            gate.release_on_behalf_of(holder)
    assert all(len(b) <= 3 for b in fake.batches)
    assert all(sum(t * 4 for t in b) <= 12 or len(b) == 1 for b in fake.batches)
    assert sorted(t for b in fake.batches for t in b) == [1, 2, 3, 4, 5, 6, 7]


async def test_closing_encoder_fails_queued_jobs_instead_of_leaving_them_waiting():
    """Invariant: when the encoder stops, every image still queued gets ``EncoderClosed``
    (nobody waits forever), and later requests are refused at once."""
    from vl.vision_encoder import EncoderClosed

    fake = BlockingForward()
    gate = trio.CapacityLimiter(1)
    holder = object()
    await gate.acquire_on_behalf_of(holder)  # the first batch waits for the device forever
    outcomes = []
    two_closed = trio.Event()
    async with trio.open_nursery() as nursery:

        async def request(tag):
            try:
                await encoder.encode(pixels(tag))
                outcomes.append("ok")
            except EncoderClosed:
                outcomes.append("closed")
                if outcomes.count("closed") == 2:
                    two_closed.set()

        async def release_once_queued_jobs_failed():
            await two_closed.wait()
            gate.release_on_behalf_of(holder)
            fake.release_all()

        try:
            async with VisionEncoder.open(fake, gate) as encoder:
                nursery.start_soon(request, 1)
                await trio.testing.wait_all_tasks_blocked()  # batch [1] formed, waits for the device
                for tag in (2, 3):
                    nursery.start_soon(request, tag)
                await trio.testing.wait_all_tasks_blocked()  # 2 and 3 queued behind it
                nursery.start_soon(release_once_queued_jobs_failed)
        finally:
            fake.release_all()
    # the batch already formed (shielded) still completes; the two queued jobs were failed
    assert sorted(outcomes) == ["closed", "closed", "ok"]
    with pytest.raises(EncoderClosed):
        await encoder.encode(pixels(4))


async def test_failed_forward_fails_each_job_with_its_own_error():
    from vl.vision_encoder import EncoderFailed

    def broken(pixel_values, grids):
        raise ValueError("bad patch")

    gate = trio.CapacityLimiter(1)
    errors = []
    async with VisionEncoder.open(broken, gate) as encoder:
        async with trio.open_nursery() as nursery:

            async def request(tag):
                try:
                    await encoder.encode(pixels(tag))
                except EncoderFailed as exc:
                    errors.append(exc)

            for tag in (1, 2):
                nursery.start_soon(request, tag)
    assert len(errors) == 2 and errors[0] is not errors[1]
    assert "bad patch" in str(errors[0])


async def test_one_bad_image_fails_only_its_own_request():
    """A batch that fails is retried image by image: the bad image's request fails, the
    others get their features."""
    from vl.vision_encoder import EncoderFailed

    seen = []

    def picky(pixel_values, grids):
        seen.append([g[0] for g in grids])
        if any(g[0] == 2 for g in grids):
            raise ValueError("image 2 is poison")
        return [ImageFeatures(pixel_values[:1].clone(), tuple(g)) for g in grids]

    gate = trio.CapacityLimiter(1)
    holder = object()
    await gate.acquire_on_behalf_of(holder)
    outcomes = {}
    async with VisionEncoder.open(picky, gate) as encoder:
        async with trio.open_nursery() as nursery:

            async def request(tag):
                try:
                    await encoder.encode(pixels(tag))
                    outcomes[tag] = "ok"
                except EncoderFailed:
                    outcomes[tag] = "failed"

            for tag in (1, 2, 3):
                nursery.start_soon(request, tag)
            await trio.testing.wait_all_tasks_blocked()
            gate.release_on_behalf_of(holder)
    assert outcomes == {1: "ok", 2: "failed", 3: "ok"}
    assert any(len(b) > 1 for b in seen)  # they really were batched first
