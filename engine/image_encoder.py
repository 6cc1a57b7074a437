"""The engine's vision encoder: images of the sequences joining a step, encoded in batches
inside that step (or ahead of it, on the encoder's own thread), with their features cached
by content.

Where it sits (docs/architecture.md, "Where images are encoded"): the step loop owns it,
so it runs wherever the step loop runs (the engine worker process by default), and an
encoder forward is part of a step, as in vLLM V1. With ``ahead_forwards`` (on a CPU, in
the worker process: ``EngineConfig.encodes_ahead``) it also owns an *ahead thread*: every
step, ``encode_ahead`` hands it forwards over the images of sequences still waiting,
newest first, so a second core encodes while the step thread decodes and encodes the
oldest; ``encode`` takes back a forward it needs that has not started, and waits only for
a running one. The ahead thread touches no state here: it runs ``_forward`` on the
tensors it was handed, and the step thread settles its futures in order.
Batches form by themselves: every joining sequence's images not yet encoded go into the
step's forwards, at most ``max_batch_images`` images and ``max_batch_patches`` patches per
forward (the scheduler keeps a step's patches within the encoder budget).

Lifecycle of an image (``ImageInput``):

- ``admit(seq_id, images)`` when the sequence arrives: a key cached already is a hit; a key
  another live sequence brought is shared; otherwise the encoder reads the pixels where
  they are, in their shared-memory slot (a view, no copy), until the image is encoded.
- ``encode(seq_ids)`` in the step that prefills them: every pending image of those
  sequences, batched. A failed forward of several images retries each alone, so a bad
  image fails only the sequences that hold it.
  A forward that holds a large image (``LargeImageThreads``) may run on more torch
  threads (the worker gives it every CPU only without an ahead thread, which is the
  second core's work otherwise): the vision attention of a 1024² photo at Qwen2-VL's
  default size is quadratic in its 5,476 patches and splits well, while the rest of the
  step stays on the step loop's one.
- ``features(seq_id)`` for the prefill, then ``release(seq_id)``. A sequence aborted or
  failed before its step is released without encoding: pixels that no live sequence holds
  are dropped, never encoded.
- ``take_slots_done()``: the sequences whose slots the encoder no longer reads, each
  reported once: at admission if it brought no pixels of its own to read (a hit, a shared
  key, a failure), else once every image read from its slots is encoded, failed or
  dropped. Until then the front end keeps those slots (``engine.slot_lease``), so the
  pixels waiting in the engine are bounded by the slot pool, and none is copied into the
  engine's heap (docs/architecture.md, "Pixel slots").

  An image handed to the ahead thread keeps its slot until that forward is settled, also
  when its sequences leave meanwhile (the forward finishes, its result goes to no sequence).

Plain synchronous code, not thread-safe: the step loop's one thread calls every method
(``close`` included); the ahead thread only runs the forwards handed to it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.prompt import ImageFeatures, ImageInput

if TYPE_CHECKING:
    from engine.pixel_slots import SlotPixels

EncodeFn = Callable[[torch.Tensor, list[tuple[int, int, int]]], list[ImageFeatures]]
# a tensor over an image's pixels in their slot (``SlotMemory.view``), valid while the slot is held
ViewPixels = Callable[["SlotPixels"], torch.Tensor]


@dataclass(frozen=True)
class LargeImageThreads:
    """``threads`` torch threads for a forward whose largest image has at least
    ``min_patches`` patches; other forwards keep the calling thread's count. In the engine
    worker, whose environment sets ``OMP_WAIT_POLICY=PASSIVE`` (``engine.worker_core``), a
    thread that finds its core taken by another process sleeps instead of spinning, so the
    extra threads cost little when the machine is busy (bench/README.md, "Refaulted memory
    and threads for large images")."""

    threads: int
    min_patches: int

    @contextmanager
    def around(self, largest_image_patches: int) -> Iterator[None]:
        """Run the block on ``threads`` torch threads if ``largest_image_patches`` reaches
        ``min_patches``; the previous count is restored on every path."""
        before = torch.get_num_threads()
        if largest_image_patches < self.min_patches or self.threads <= before:
            yield
            return
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


# every forward on the calling thread's count (a ``threads`` of 0 never raises it)
CALLERS_THREADS = LargeImageThreads(threads=0, min_patches=0)


@dataclass(frozen=True)
class EncoderStatistics:
    batches: int = 0
    images_encoded: int = 0
    images_dropped: int = 0  # pixels released unencoded (their sequences left first)
    largest_batch: int = 0
    last_batch: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    pending_images: int = 0
    images_encoded_ahead: int = 0  # of ``images_encoded``, by the ahead thread


# forwards whose (images, seconds) wait for ``take_batch_times``: the step loop takes them
# every step; the bound only matters to a caller that never does
BATCH_TIMES_KEPT = 1024
# forwards the ahead thread holds at once: one running, one queued behind it (so it never
# idles while the step thread is inside a long step), little enough that the step thread
# seldom has to take one back
AHEAD_FORWARDS = 2


class ImageEncodingFailed(RuntimeError):
    """An image of this sequence could not be encoded (the sequence fails, not the engine)."""


class _Pending:
    """An image whose pixels the engine reads from the slot of sequence ``reader_of`` and
    has not encoded yet."""

    __slots__ = (
        "ahead",
        "ahead_failed",
        "error",
        "features",
        "grid_thw",
        "holders",
        "key",
        "pixel_values",
        "reader_of",
    )

    def __init__(self, key: str, grid_thw: tuple[int, int, int], pixel_values: torch.Tensor, reader_of: int) -> None:
        self.key = key
        self.grid_thw = grid_thw
        self.pixel_values: torch.Tensor | None = pixel_values
        self.reader_of: int | None = reader_of  # whose slot ``pixel_values`` views; None once done
        self.features: ImageFeatures | None = None
        self.error: str | None = None
        self.holders = 0
        self.ahead: _AheadForward | None = None  # handed to the ahead thread, not settled yet
        self.ahead_failed = False  # a forward on the ahead thread failed: the step thread retries it

    @property
    def claimable(self) -> bool:
        """Not ready, and free for the ahead thread to take."""
        return not self.ready and self.ahead is None and not self.ahead_failed

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def ready(self) -> bool:
        """Encoded, or failed: nothing more to do for it."""
        return self.features is not None or self.error is not None


_Held = ImageFeatures | _Pending


class _AheadForward:
    """A forward handed to the ahead thread: its images and the future of its
    ``(features, seconds)``. Its images' pixels stay unreleased until it is settled."""

    __slots__ = ("future", "images")

    def __init__(self, images: list[_Pending], future: Future) -> None:
        self.images = images
        self.future = future


class FeatureCache:
    """Features by image key, least recently used first out, bounded in bytes; an entry
    larger than the whole bound is not kept."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[str, ImageFeatures] = collections.OrderedDict()
        self.bytes = 0

    @staticmethod
    def size(features: ImageFeatures) -> int:
        return features.embeddings.numel() * features.embeddings.element_size()

    def get(self, key: str) -> ImageFeatures | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: str, features: ImageFeatures) -> None:
        size = self.size(features)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self.size(old)
        self._entries[key] = features
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= self.size(evicted)

    def __len__(self) -> int:
        return len(self._entries)


class ImageEncoder:
    def __init__(
        self,
        encode_fn: EncodeFn,
        view_pixels: ViewPixels | None,
        *,
        max_batch_images: int = 16,
        max_batch_patches: int = 32768,
        cache_bytes: int = 256 << 20,
        large_image: LargeImageThreads = CALLERS_THREADS,
        ahead_forwards: int = 0,
    ) -> None:
        """``encode_fn(pixel_values, grids)`` is the vision tower (one features per image);
        ``view_pixels`` gives a tensor over a slot's pixels (``SlotMemory.view``); ``None``
        when no slots exist (then only ``ImageFeatures`` inputs are accepted). ``large_image``: the torch
        threads of forwards holding a large image (by default every forward on the caller's).
        ``ahead_forwards`` > 0 starts the ahead thread (one torch thread), which runs at most
        that many forwards handed to it by ``encode_ahead`` at a time; ``close()`` stops it."""
        if max_batch_images < 1 or max_batch_patches < 1:
            raise ValueError("the encoder's batch limits must be at least 1")
        if ahead_forwards < 0:
            raise ValueError("ahead_forwards must be at least 0")
        self._encode_fn = encode_fn
        self._view_pixels = view_pixels
        self.max_batch_images = max_batch_images
        self.max_batch_patches = max_batch_patches
        self._cache = FeatureCache(cache_bytes)
        self._large_image = large_image
        self._pending: dict[str, _Pending] = {}
        self._held: dict[int, list[_Held]] = {}
        # sequences admitted whose slots are still read: images not done (+1 while admitting)
        self._reading: dict[int, int] = {}
        self._slots_done: list[int] = []  # sequences whose slots are no longer read, in order
        self._batches = 0
        self._encoded = 0
        self._encoded_ahead = 0
        self._dropped = 0
        self._largest = 0
        self._last = 0
        self._hits = 0
        self._misses = 0
        # (images, seconds) of each forward since the step loop last took them
        self._batch_times: collections.deque[tuple[int, float]] = collections.deque(maxlen=BATCH_TIMES_KEPT)
        self._ahead_forwards = ahead_forwards
        self._ahead: ThreadPoolExecutor | None = None
        if ahead_forwards:
            self._ahead = ThreadPoolExecutor(1, thread_name_prefix="vision-ahead", initializer=_one_torch_thread)
        self._out: collections.deque[_AheadForward] = collections.deque()  # handed out, in order, not settled

    def admit(self, seq_id: int, images: Iterable[ImageFeatures | ImageInput]) -> None:
        """Take the images of a new sequence: cached or shared keys need nothing; other
        pixels are viewed in their slot, which the encoder reads until they are encoded.
        Raises what ``view_pixels`` raises (the sequence is then failed by the caller,
        holding nothing). Either way ``seq_id`` is reported by ``take_slots_done`` exactly
        once (at once if nothing of its slots is read)."""
        held: list[_Held] = []
        self._reading[seq_id] = 1  # admission's own count: no report while images are taken
        try:
            for image in images:
                held.append(self._take(seq_id, image))
        except BaseException:
            self._drop(held)
            raise
        else:
            self._held[seq_id] = held
        finally:
            self._done_reading(seq_id)

    def _take(self, seq_id: int, image: ImageFeatures | ImageInput) -> _Held:
        if isinstance(image, ImageFeatures):
            return image
        cached = self._cache.get(image.key)
        if cached is not None:
            self._hits += 1
            return cached
        self._misses += 1
        pending = self._pending.get(image.key)
        if pending is None:
            if self._view_pixels is None:
                raise RuntimeError("this engine has no pixel slots to read images from")
            pending = _Pending(image.key, image.grid_thw, self._view_pixels(image.pixels), reader_of=seq_id)
            self._pending[image.key] = pending
            self._reading[seq_id] += 1
        pending.holders += 1
        return pending

    def _done_reading(self, seq_id: int) -> None:
        """One image (or admission) of ``seq_id`` no longer reads its slots; the last one
        reports the sequence."""
        left = self._reading[seq_id] - 1
        if left:
            self._reading[seq_id] = left
        else:
            del self._reading[seq_id]
            self._slots_done.append(seq_id)

    def _is_current(self, pending: _Pending) -> bool:
        """``pending`` is still the image its key waits on: not dropped (its holders all
        left) nor settled, and no later sequence brought the key afresh."""
        return self._pending.get(pending.key) is pending

    def _forget_pixels(self, pending: _Pending) -> None:
        """The pending image's pixels are no longer needed (encoded, failed or dropped) and
        no forward reads them: drop the view and tell its slot's sequence (once)."""
        pending.pixel_values = None
        if pending.reader_of is not None:
            reader_of, pending.reader_of = pending.reader_of, None
            self._done_reading(reader_of)

    def take_slots_done(self) -> list[int]:
        """Sequences whose pixel slots the encoder no longer reads since the last call, in
        the order they became so (forwards the ahead thread finished are settled first);
        each admitted sequence appears exactly once."""
        self._settle_ahead(wait=False)
        done, self._slots_done = self._slots_done, []
        return done

    def patches_to_encode(self, seq_id: int) -> int:
        """Patches of this sequence's images still to encode (0 if all are ready)."""
        return sum(h.num_patches for h in self._held.get(seq_id, ()) if isinstance(h, _Pending) and not h.ready)

    def _pending_of(self, seq_ids: Iterable[int], wanted: Callable[[_Pending], bool]) -> list[_Pending]:
        """The pending images of ``seq_ids`` for which ``wanted`` holds, each once, in order."""
        found: list[_Pending] = []
        seen: set[int] = set()
        for seq_id in seq_ids:
            for h in self._held.get(seq_id, ()):
                if isinstance(h, _Pending) and id(h) not in seen and wanted(h):
                    seen.add(id(h))
                    found.append(h)
        return found

    def encode(self, seq_ids: Iterable[int]) -> dict[int, str]:
        """Encode every pending image of ``seq_ids``; returns an error message for each
        sequence that holds an image that failed (its other images may be encoded).

        Images handed to the ahead thread and not started yet are taken back and encoded
        here; for those it is running, this waits. An image whose ahead forward failed is
        encoded here again (alone if its batch fails again)."""
        ids = list(seq_ids)
        while True:
            self._settle_ahead(wait=False)
            todo = self._pending_of(ids, lambda h: not h.ready)
            for forward in {id(h.ahead): h.ahead for h in todo if h.ahead is not None}.values():
                self._take_back(forward)
            mine = [h for h in todo if h.ahead is None]
            if mine:
                for batch in self._batches_of(mine):
                    self._encode_batch(batch, retry_alone=True)
            elif todo:
                self._settle_next()  # every image left is on the ahead thread, running
            else:
                break
        failures = {}
        for seq_id in ids:
            errors = [h.error for h in self._held.get(seq_id, ()) if isinstance(h, _Pending) and h.error]
            if errors:
                failures[seq_id] = errors[0]
        return failures

    def encode_ahead(self, newest_first: Iterable[int]) -> None:
        """Hand the ahead thread forwards of the pending images of ``newest_first``
        (sequences still waiting, the last to join first) until it holds ``ahead_forwards``
        of them; settle the ones it finished. Does nothing without an ahead thread (then
        ``newest_first`` is not read).

        The step loop calls it every step, so images are encoded on a second core while
        running sequences decode. The newest sequences' images go first: the step thread
        encodes the oldest ones in the steps that prefill them, this thread works from the
        other end, and the two meet without one waiting for a forward the other is running
        (from then on joining sequences find their images encoded)."""
        if self._ahead is None:
            return
        self._settle_ahead(wait=False)
        if len(self._out) >= self._ahead_forwards:
            return
        for batch in self._batches_of(self._pending_of(newest_first, lambda h: h.claimable)):
            if len(self._out) >= self._ahead_forwards:
                break
            self._hand_ahead(batch)

    def _hand_ahead(self, batch: list[_Pending]) -> None:
        pixel_values = [p.pixel_values for p in batch]
        grids = [p.grid_thw for p in batch]
        forward = _AheadForward(batch, self._ahead.submit(self._forward, pixel_values, grids))
        for pending in batch:
            pending.ahead = forward
        self._out.append(forward)

    def _take_back(self, forward: _AheadForward) -> bool:
        """Cancel ``forward`` if the ahead thread has not started it: its images are free
        to encode elsewhere. False if it is running or done (it is then settled later)."""
        if not forward.future.cancel():
            return False
        self._out.remove(forward)
        for pending in forward.images:
            pending.ahead = None
            if not self._is_current(pending):  # dropped while handed out
                self._dropped += 1
                self._forget_pixels(pending)
        return True

    @property
    def ahead_busy(self) -> bool:
        """Forwards are handed to the ahead thread and not settled yet (their pixel slots
        are not reported done until they are)."""
        return bool(self._out)

    def finish_ahead(self) -> None:
        """Wait for every forward handed to the ahead thread, and settle each."""
        self._settle_ahead(wait=True)

    def _settle_ahead(self, *, wait: bool) -> None:
        """Settle the ahead thread's forwards in the order they were handed out (its one
        thread finishes them in that order): every finished one, or with ``wait`` all."""
        while self._out and (wait or self._out[0].future.done()):
            self._settle_next()

    def _settle_next(self) -> None:
        """Wait for the oldest forward handed out, and apply it: its images get their
        features (and the cache), or, if it failed, go back to the step thread."""
        forward = self._out.popleft()
        try:
            results, seconds = forward.future.result()
        except Exception:
            for pending in forward.images:
                pending.ahead = None
                pending.ahead_failed = True
                if not self._is_current(pending):  # dropped while handed out
                    self._forget_pixels(pending)
            return
        for pending in forward.images:
            pending.ahead = None
        self._encoded_ahead += len(forward.images)
        self._record(forward.images, results, seconds)

    def close(self) -> None:
        """Stop the ahead thread: forwards not started are cancelled, a running one is
        waited for; every image's pixels are then free (idempotent)."""
        for forward in list(self._out):
            self._take_back(forward)
        self._settle_ahead(wait=True)
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)
            self._ahead = None

    def _batches_of(self, todo: list[_Pending]) -> Iterable[list[_Pending]]:
        batch: list[_Pending] = []
        patches = 0
        for pending in todo:
            if batch and (
                len(batch) >= self.max_batch_images or patches + pending.num_patches > self.max_batch_patches
            ):
                yield batch
                batch, patches = [], 0
            batch.append(pending)
            patches += pending.num_patches
        if batch:
            yield batch

    def _forward(
        self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]
    ) -> tuple[list[ImageFeatures], float]:
        """One vision-tower forward over these images: their features and its seconds.
        Touches no encoder state (the ahead thread runs it too)."""
        started = time.perf_counter()
        # one image: the view of its slot (a 1024² image's pixels are 25 MiB; a copy costs faults and time)
        values = pixel_values[0] if len(pixel_values) == 1 else torch.cat(pixel_values)
        with torch.inference_mode():
            results = self._encode_fn(values, grids)
        if len(results) != len(grids):
            raise RuntimeError(f"the vision tower returned {len(results)} results for {len(grids)} images")
        return results, time.perf_counter() - started

    def _encode_batch(self, batch: list[_Pending], *, retry_alone: bool) -> None:
        try:
            with self._large_image.around(max(p.num_patches for p in batch)):
                results, seconds = self._forward([p.pixel_values for p in batch], [p.grid_thw for p in batch])
        except Exception as exc:
            if retry_alone and len(batch) > 1:
                for pending in batch:
                    self._encode_batch([pending], retry_alone=False)
                return
            for pending in batch:
                pending.error = f"vision encoding failed: {type(exc).__name__}: {exc}"
                self._forget_pixels(pending)
                if self._is_current(pending):
                    del self._pending[pending.key]  # a later sequence with this image tries afresh
            return
        self._record(batch, results, seconds)

    def _record(self, batch: list[_Pending], results: list[ImageFeatures], seconds: float) -> None:
        """A forward over ``batch`` succeeded: each image gets its features (cached by
        key), and its pixels are no longer read."""
        self._batches += 1
        self._batch_times.append((len(batch), seconds))
        self._last = len(batch)
        self._largest = max(self._largest, len(batch))
        for pending, features in zip(batch, results, strict=True):
            pending.features = features
            self._forget_pixels(pending)
            self._encoded += 1
            self._cache.put(pending.key, features)
            if self._is_current(pending):
                del self._pending[pending.key]  # later sequences find it in the cache

    def features(self, seq_id: int) -> list[ImageFeatures]:
        """The features of this sequence's images, in order. Raises
        ``ImageEncodingFailed`` if one failed, ``RuntimeError`` if one is not encoded yet."""
        out = []
        for h in self._held.get(seq_id, ()):
            if isinstance(h, ImageFeatures):
                out.append(h)
            elif h.error:
                raise ImageEncodingFailed(h.error)
            elif h.features is None:
                raise RuntimeError("an image of this sequence has not been encoded")
            else:
                out.append(h.features)
        return out

    def release(self, seq_id: int) -> None:
        """Forget this sequence's images (idempotent). Pixels no other live sequence holds
        are dropped unencoded; if the ahead thread is running a forward over them, it
        finishes, its result is cached for no one, and only then are their slots reported
        done (never while a forward reads them)."""
        self._drop(self._held.pop(seq_id, ()))

    def _drop(self, held: Iterable[_Held]) -> None:
        for h in held:
            if not isinstance(h, _Pending):
                continue
            h.holders -= 1
            if h.holders == 0 and self._is_current(h):
                del self._pending[h.key]
                if h.ahead is not None:
                    self._take_back(h.ahead)  # not started: forgotten there; else when settled
                    continue
                if not h.ready:
                    self._dropped += 1
                self._forget_pixels(h)

    def take_batch_times(self) -> tuple[tuple[int, float], ...]:
        """(images, seconds) of each successful forward since the last call, oldest first."""
        taken = tuple(self._batch_times)
        self._batch_times.clear()
        return taken

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._held

    def statistics(self) -> EncoderStatistics:
        return EncoderStatistics(
            batches=self._batches,
            images_encoded=self._encoded,
            images_dropped=self._dropped,
            largest_batch=self._largest,
            last_batch=self._last,
            cache_hits=self._hits,
            cache_misses=self._misses,
            cache_entries=len(self._cache),
            cache_bytes=self._cache.bytes,
            pending_images=len(self._pending),
            images_encoded_ahead=self._encoded_ahead,
        )


def _one_torch_thread() -> None:
    """The ahead thread's torch runs on one thread: its parallelism is the step thread's
    work beside it, not OpenMP threads waiting at barriers for a core another process holds."""
    torch.set_num_threads(1)
