"""The vision encoder component: batches images from many requests into shared forwards.

A batcher task, owned by the encoder's nursery, takes jobs from a bounded channel and
forms batches of at most ``max_batch_size`` images and ``max_batch_patches`` patches. Each
batch's forward runs in a worker thread under the device gate, inside a cancel scope that
is shielded: the batch belongs to the encoder, not to any one request. A request awaits
only its own job. If a request is cancelled, its job is marked abandoned: not yet started,
it is dropped when the next batch is formed; already in a batch, the batch finishes and
its result is discarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
import trio

from engine.prompt import ImageFeatures
from vl.image_pixels import PixelInputs

EncodeFn = Callable[[torch.Tensor, list[tuple[int, int, int]]], list[ImageFeatures]]


@dataclass(frozen=True)
class VisionEncoderStatistics:
    queued: int
    batches_run: int
    images_encoded: int
    images_dropped: int
    largest_batch: int
    last_batch_size: int
    forward_running: bool


class EncoderFailed(RuntimeError):
    """The batch this image was in could not be encoded (a server-side failure)."""


class EncoderClosed(EncoderFailed):
    """The encoder stopped before this image was encoded."""


class _Job:
    __slots__ = ("abandoned", "done", "error", "pixels", "result")

    def __init__(self, pixels: PixelInputs) -> None:
        self.pixels = pixels
        self.done = trio.Event()
        self.result: ImageFeatures | None = None
        self.error: BaseException | None = None
        self.abandoned = False


class VisionEncoder:
    def __init__(
        self,
        encode_fn: EncodeFn,
        device_gate: trio.CapacityLimiter,
        *,
        max_batch_size: int = 16,
        max_batch_patches: int = 32768,
        queue_size: int | None = None,
    ) -> None:
        self._encode_fn = encode_fn
        self._device_gate = device_gate
        self.max_batch_size = max_batch_size
        self.max_batch_patches = max_batch_patches
        self._send, self._receive = trio.open_memory_channel[_Job](queue_size or 4 * max_batch_size)
        self._held_over: _Job | None = None
        self._batches = 0
        self._encoded = 0
        self._dropped = 0
        self._largest = 0
        self._last = 0
        self._running = False
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls, encode_fn: EncodeFn, device_gate: trio.CapacityLimiter, **options
    ) -> AsyncIterator[VisionEncoder]:
        """Run the batcher for the duration of the block. On exit the batcher is cancelled
        after its current forward (if any) has finished."""
        encoder = cls(encode_fn, device_gate, **options)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(encoder._batch_loop)
            try:
                yield encoder
            finally:
                nursery.cancel_scope.cancel()
                encoder._close()

    async def encode(self, pixels: PixelInputs) -> ImageFeatures:
        """Encode one image as part of some batch and return its features.

        Cancellation: while queued, the job is marked abandoned and will never run;
        while its batch runs, the batch completes for everyone else and this result is
        dropped. Either way this call raises ``Cancelled`` promptly.
        Raises ``EncoderFailed`` if its batch failed, ``EncoderClosed`` if the encoder
        stopped first (queued jobs are failed when the encoder closes, never left waiting).
        """
        if self._closed:
            raise EncoderClosed("the vision encoder has stopped")
        job = _Job(pixels)
        try:
            await self._send.send(job)
        except trio.ClosedResourceError:
            raise EncoderClosed("the vision encoder has stopped") from None
        try:
            await job.done.wait()
        finally:
            if not job.done.is_set():
                job.abandoned = True
        if job.error is not None:
            raise job.error
        return job.result

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                with trio.CancelScope(shield=True):
                    await self._encode_batch(batch, retry_alone=True)

    async def _encode_batch(self, batch: list[_Job], *, retry_alone: bool) -> None:
        """Run one forward for ``batch`` and finish its jobs. If a batch of several fails,
        each image is retried alone, so one bad image fails only its own request.
        Called shielded: the batch belongs to the encoder, not to any requester."""
        self._running = True
        try:
            results = await trio.to_thread.run_sync(self._forward, batch, limiter=self._device_gate)
            if len(results) != len(batch):
                raise RuntimeError(f"encoder returned {len(results)} results for {len(batch)} images")
        except Exception as exc:
            if retry_alone and len(batch) > 1:
                for job in batch:
                    await self._encode_batch([job], retry_alone=False)
                return
            message = f"vision encoding failed: {type(exc).__name__}: {exc}"
            self._fail(batch, lambda: EncoderFailed(message))
            return
        finally:
            self._running = False
        self._batches += 1
        self._last = len(batch)
        self._largest = max(self._largest, len(batch))
        for job, features in zip(batch, results, strict=True):
            job.result = features
            self._encoded += 1
            job.done.set()

    async def _next_batch(self) -> list[_Job]:
        """Wait for one job, then take whatever else is queued, up to the batch limits."""
        first = self._held_over or await self._receive.receive()
        self._held_over = None
        batch: list[_Job] = []
        patches = 0
        candidate: _Job | None = first
        while candidate is not None:
            if candidate.abandoned:
                self._dropped += 1
            elif batch and (
                len(batch) >= self.max_batch_size or patches + candidate.pixels.num_patches > self.max_batch_patches
            ):
                self._held_over = candidate
                break
            else:
                batch.append(candidate)
                patches += candidate.pixels.num_patches
            try:
                candidate = self._receive.receive_nowait()
            except trio.WouldBlock:
                candidate = None
        return batch

    @staticmethod
    def _fail(jobs: list[_Job], make_error: Callable[[], EncoderFailed]) -> None:
        """Finish ``jobs`` with an error each (a fresh instance per job)."""
        for job in jobs:
            job.error = make_error()
            job.done.set()

    def _close(self) -> None:
        """Fail every job still queued: nobody will run them now. Synchronous, on exit."""
        self._closed = True
        pending = [self._held_over] if self._held_over else []
        self._held_over = None
        while True:
            try:
                pending.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._fail(pending, lambda: EncoderClosed("the vision encoder has stopped"))
        self._send.close()

    def _forward(self, batch: list[_Job]) -> list[ImageFeatures]:
        pixel_values = torch.cat([job.pixels.pixel_values for job in batch])
        grids = [job.pixels.grid_thw for job in batch]
        with torch.inference_mode():
            return self._encode_fn(pixel_values, grids)

    def statistics(self) -> VisionEncoderStatistics:
        return VisionEncoderStatistics(
            queued=self._receive.statistics().current_buffer_used + (1 if self._held_over else 0),
            batches_run=self._batches,
            images_encoded=self._encoded,
            images_dropped=self._dropped,
            largest_batch=self._largest,
            last_batch_size=self._last,
            forward_running=self._running,
        )
