"""The shared-memory pixel slot pool: a gated resource over one segment, and its views."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
import trio
import trio.testing

from engine.pixel_slots import (
    SlotMemory,
    SlotPixels,
    SlotPool,
    SlotPoolError,
    SlotSpec,
    SlotTooSmall,
    check_shm_space,
)
from tests.engine.slot_children import seeded_tensor

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024


def segment_exists(spec: SlotSpec) -> bool:
    return Path("/dev/shm", spec.name).exists()


def counts(pool: SlotPool) -> tuple[int, int, int, int]:
    stats = pool.statistics()
    return stats.total, stats.free, stats.waiting, stats.acquired


# Acquiring and releasing ---------------------------------------------------------------------


async def test_acquire_release_and_statistics():
    with SlotPool.create(3, 64 * KIB) as pool:
        assert counts(pool) == (3, 3, 0, 0)
        slots = [await pool.acquire() for _ in range(3)]
        assert sorted(slot.index for slot in slots) == [0, 1, 2]
        assert counts(pool) == (3, 0, 0, 3)
        slots[1].release()
        assert slots[1].released and counts(pool) == (3, 1, 0, 3)
        slots[1].release()  # idempotent: the slot is not given back twice
        assert counts(pool) == (3, 1, 0, 3)
        again = await pool.acquire()
        assert again.index == slots[1].index and not again.released
        assert counts(pool) == (3, 0, 0, 4)


async def test_a_waiter_blocks_while_none_is_free_and_wakes_on_release():
    with SlotPool.create(1, 64 * KIB) as pool:
        held = await pool.acquire()
        got: list[int] = []

        async def waiter() -> None:
            got.append((await pool.acquire()).index)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and counts(pool) == (1, 0, 1, 1)
            held.release()
            await trio.testing.wait_all_tasks_blocked()
            assert got == [held.index]
        assert counts(pool) == (1, 0, 0, 2)


async def test_waiters_are_served_first_come_first_served():
    """Releases hand slots to waiters in the order they began waiting, and a newcomer
    arriving after a release does not overtake the woken waiter."""
    with SlotPool.create(2, 64 * KIB) as pool:
        held = [await pool.acquire(), await pool.acquire()]
        order: list[str] = []

        async def waiter(name: str) -> None:
            await pool.acquire()
            order.append(name)

        async with trio.open_nursery() as nursery:
            for name in ("first", "second", "third"):
                nursery.start_soon(waiter, name)
                await trio.testing.wait_all_tasks_blocked()
            held[0].release()
            nursery.start_soon(waiter, "newcomer")  # starts after the release, before "first" runs
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["first"]
            held[1].release()
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["first", "second"]
            nursery.cancel_scope.cancel()
        assert "newcomer" not in order


async def test_a_cancelled_waiter_takes_nothing():
    """Invariant: a task cancelled while waiting in ``acquire`` takes no slot; the slot
    released afterwards goes to the next waiter, or back to the pool."""
    with SlotPool.create(1, 64 * KIB) as pool:
        held = await pool.acquire()
        got: list[int] = []

        async def waiter(scope: trio.CancelScope) -> None:
            with scope:
                got.append((await pool.acquire()).index)

        cancelled, patient = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, cancelled)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, patient)
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert counts(pool) == (1, 0, 1, 1)
            held.release()
        assert cancelled.cancelled_caught and got == [0]  # only the patient waiter
        assert counts(pool) == (1, 0, 0, 2)


async def test_a_waiter_woken_and_cancelled_in_one_pass_gets_its_slot_and_gives_it_back():
    """Invariant: a slot handed to a waiter is never lost, even if the waiter is cancelled
    before it runs: ``acquire`` returns it, and the holder's ``finally`` releases it."""
    with SlotPool.create(1, 64 * KIB) as pool:
        held = await pool.acquire()
        scope = trio.CancelScope()
        acquired: list[int] = []

        async def holder() -> None:
            with scope:
                slot = await pool.acquire()
                try:
                    acquired.append(slot.index)
                    await trio.sleep_forever()
                finally:
                    slot.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await trio.testing.wait_all_tasks_blocked()
            held.release()
            scope.cancel()  # same pass: the waiter was woken but has not run yet
        assert acquired == [0] and scope.cancelled_caught
        assert counts(pool) == (1, 1, 0, 2)


async def test_acquire_many_lets_only_the_caller_at_the_turnstile_hold_part_of_its_slots():
    """Invariant: of the callers waiting for several slots, only the one whose turn it is
    holds part of what it asked for; the others hold nothing, so callers wanting several
    slots can never each hold some and wait for each other. Three callers wanting 3 of 4:
    the second collects the free slot and waits, the third holds none, and each gets its
    three in turn as the slots come back."""
    with SlotPool.create(4, 64 * KIB) as pool:
        got: dict[str, list[int]] = {}
        done = {name: trio.Event() for name in ("first", "second", "third")}

        async def request(name: str) -> None:
            slots = await pool.acquire_many(3)
            got[name] = [slot.index for slot in slots]
            await done[name].wait()
            for slot in slots:
                slot.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "second")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "third")
            await trio.testing.wait_all_tasks_blocked()
            assert list(got) == ["first"] and counts(pool) == (4, 0, 2, 4)  # "third" holds none
            done["first"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert list(got) == ["first", "second"] and counts(pool) == (4, 0, 1, 7)  # "third" took one
            done["second"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert list(got) == ["first", "second", "third"]
            done["third"].set()
        assert counts(pool) == (4, 4, 0, 9)


async def test_a_caller_asking_for_many_is_not_overtaken_by_later_small_ones():
    """First come, first served holds across sizes: while a caller at the turnstile
    collects its slots, a later caller wanting one waits even though one is free, so a
    request with many images is not starved by a stream of single-image ones."""
    with SlotPool.create(3, 64 * KIB) as pool:
        held = await pool.acquire_many(2)
        order: list[str] = []

        async def request(name: str, n: int) -> None:
            await pool.acquire_many(n)
            order.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "big", 3)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "small", 1)
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and counts(pool)[1:3] == (0, 2)  # "big" holds the free one
            for slot in held:
                slot.release()
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["big"]
            nursery.cancel_scope.cancel()


async def test_a_caller_cancelled_while_collecting_gives_back_what_it_had():
    with SlotPool.create(2, 64 * KIB) as pool:
        held = await pool.acquire()
        scope = trio.CancelScope()

        async def request() -> None:
            with scope:
                await pool.acquire_many(2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            assert counts(pool)[1:3] == (0, 1)  # it holds the free slot and waits for the other
            scope.cancel()
        assert scope.cancelled_caught and counts(pool)[1:3] == (1, 0)
        held.release()
        assert counts(pool)[1] == 2


async def test_acquire_many_refuses_what_could_never_be_free_at_once():
    with SlotPool.create(2, 64 * KIB) as pool:
        for n in (0, 3):
            with pytest.raises(ValueError, match="from a pool of 2"):
                await pool.acquire_many(n)
        assert counts(pool) == (2, 2, 0, 0)


# The segment's lifetime and the start-up check -------------------------------------------------


def test_the_segment_is_unlinked_when_create_exits():
    with SlotPool.create(2, 64 * KIB) as pool:
        spec = pool.spec
        assert segment_exists(spec)
    assert not segment_exists(spec)
    assert pool.memory.closed


def test_the_segment_is_unlinked_when_the_block_raises():
    with pytest.raises(KeyError):
        with SlotPool.create(2, 64 * KIB) as pool:
            spec = pool.spec
            pool.memory.write(0, torch.ones(8))
            raise KeyError("boom")
    assert not segment_exists(spec)


def test_too_little_shared_memory_is_a_clear_error_naming_the_flags():
    with pytest.raises(SlotPoolError) as error:
        check_shm_space(needed=80 * 1024 * 1024, available=64 * 1024 * 1024)
    message = str(error.value)
    assert "83886080 bytes" in message and "67108864 bytes" in message
    assert "--pixel-slots" in message and "--pixel-slot-mb" in message
    check_shm_space(needed=64, available=64)  # exactly enough is enough


def test_create_checks_free_space_before_making_a_segment(monkeypatch):
    """``create`` asks ``statvfs`` of ``shm_dir`` and refuses a pool larger than its free space."""
    real_statvfs = os.statvfs
    asked: list[str] = []

    def small_statvfs(path):
        asked.append(path)
        real = real_statvfs(path)
        return os.statvfs_result((real.f_bsize, 4096, real.f_blocks, 10, 10, *real[5:]))

    monkeypatch.setattr(os, "statvfs", small_statvfs)
    with pytest.raises(SlotPoolError, match=r"needs 81920 bytes .* has 40960 bytes"):
        with SlotPool.create(2, 40 * KIB, shm_dir="/dev/shm"):
            pytest.fail("the pool must not be made")
    assert asked == ["/dev/shm"]
    with SlotPool.create(1, 40 * KIB) as pool:  # fits in 40 KiB
        assert segment_exists(pool.spec)


# Writing and reading ---------------------------------------------------------------------------


def test_write_then_read_gives_an_identical_private_copy():
    with SlotPool.create(2, 256 * KIB) as pool:
        tensor = seeded_tensor(1)
        pixels = pool.memory.write(1, tensor)
        assert pixels == SlotPixels(index=1, shape=(37, 1176), dtype="float32")
        assert pixels.nbytes == tensor.numel() * 4
        assert pickle.loads(pickle.dumps(pixels)) == pixels
        first = pool.memory.read(pixels)
        assert torch.equal(first, tensor) and first.dtype == torch.float32
        pool.memory.write(1, seeded_tensor(2))  # the slot is reused
        assert torch.equal(first, tensor)  # the earlier read is not a view of the slot
        assert torch.equal(pool.memory.read(pixels), seeded_tensor(2))


def test_a_view_reads_the_slot_in_place():
    """``view``: the descriptor's tensor over the slot's memory itself (what the engine's
    encoder reads until the image is encoded): equal to what was written, and it sees the
    slot's next contents, since nothing was copied."""
    with SlotPool.create(2, 256 * KIB) as pool:
        pixels = pool.memory.write(1, seeded_tensor(1))
        view = pool.memory.view(pixels)
        assert torch.equal(view, seeded_tensor(1)) and view.shape == (37, 1176)
        pool.memory.write(1, seeded_tensor(2))
        assert torch.equal(view, seeded_tensor(2))
        del view
        with pytest.raises(IndexError):
            pool.memory.view(SlotPixels(index=2, shape=(1,), dtype="float32"))


def test_dtypes_and_non_contiguous_tensors_round_trip():
    with SlotPool.create(1, 64 * KIB) as pool:
        for tensor in (
            torch.arange(12, dtype=torch.int64).reshape(3, 4).t(),  # not contiguous
            torch.linspace(0, 1, 50).to(torch.bfloat16),
            torch.tensor([True, False, True]),
            torch.empty(0, 5),
        ):
            pixels = pool.memory.write(0, tensor)
            assert pixels.nbytes == tensor.numel() * tensor.element_size()
            out = pool.memory.read(pixels)
            assert out.dtype == tensor.dtype and torch.equal(out, tensor)


def test_a_tensor_larger_than_a_slot_is_refused():
    with SlotPool.create(2, 1 * KIB) as pool:
        with pytest.raises(SlotTooSmall, match="--pixel-slot-mb"):
            pool.memory.write(0, torch.zeros(257))  # 1028 bytes
        pool.memory.write(1, torch.zeros(256))  # exactly a slot
        with pytest.raises(IndexError):
            pool.memory.write(2, torch.zeros(1))


def test_values_written_into_a_view_are_the_slot_and_need_no_copy():
    """A producer writing into ``tensor_view`` writes the slot itself: ``write`` of that
    view gives the descriptor without copying, a reader sees the values, a view too large
    for a slot is refused before anything is written, and once the views are dropped the
    mapping closes."""
    with SlotPool.create(2, 64 * KIB) as pool:
        memory = SlotMemory.attach(pool.spec)
        view = memory.tensor_view(1, (37, 100))
        assert view.dtype == torch.float32 and view.is_contiguous()
        view.copy_(seeded_tensor(3)[:, :100])
        with patch.object(torch.Tensor, "copy_", side_effect=AssertionError("copied")):
            pixels = memory.write(1, view)
        assert pixels == SlotPixels(index=1, shape=(37, 100), dtype="float32")
        assert torch.equal(pool.memory.read(pixels), seeded_tensor(3)[:, :100])
        other = memory.tensor_view(0, (2, 3), "int64")
        other.fill_(7)
        assert torch.equal(pool.memory.read(memory.write(0, other)), torch.full((2, 3), 7))
        with pytest.raises(SlotTooSmall, match="--pixel-slot-mb"):
            memory.tensor_view(0, (64 * KIB // 4 + 1,))
        with pytest.raises(IndexError):
            memory.tensor_view(2, (1,))
        del view, other
        memory.close()


def test_arrays_written_into_a_view_are_the_slot_and_keep_the_mapping_open():
    """``array_view`` is the NumPy form of ``tensor_view`` (what prep writes pixels into,
    without torch): ``write`` of that view copies nothing, a reader sees the values, a
    view too large for a slot is refused; a NumPy array written from elsewhere (even
    non-contiguous) is copied; while a view is alive the mapping refuses to close."""
    with SlotPool.create(2, 64 * KIB) as pool:
        memory = SlotMemory.attach(pool.spec)
        expected = seeded_tensor(3)[:, :100].numpy()
        view = memory.array_view(1, (37, 100))
        assert view.dtype == np.float32 and view.flags.c_contiguous and view.flags.writeable
        view[...] = expected
        with patch.object(np, "copyto", side_effect=AssertionError("copied")):
            pixels = memory.write(1, view)
        assert pixels == SlotPixels(index=1, shape=(37, 100), dtype="float32")
        assert torch.equal(pool.memory.read(pixels), torch.from_numpy(expected))
        strided = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2]
        assert np.array_equal(pool.memory.read(memory.write(0, strided)).numpy(), strided)
        with pytest.raises(SlotTooSmall, match="--pixel-slot-mb"):
            memory.array_view(0, (64 * KIB // 4 + 1,))
        with pytest.raises(IndexError):
            memory.array_view(2, (1,))
        with pytest.raises(BufferError):
            memory.close()
        del view
        memory.close()
        assert memory.closed


def test_close_leaves_no_view_behind():
    """After writes and reads (a refused one included) the mapping closes without
    ``BufferError``; a closed view refuses work; closing twice is fine."""
    with SlotPool.create(1, 1 * KIB) as pool:
        memory = SlotMemory.attach(pool.spec)
        pixels = memory.write(0, torch.ones(4))
        kept = memory.read(pixels)
        with pytest.raises(SlotTooSmall):
            memory.write(0, torch.ones(1000))
        memory.close()
        memory.close()
        assert torch.equal(kept, torch.ones(4))
        with pytest.raises(ValueError, match="closed"):
            memory.read(pixels)


def test_the_module_is_light():
    """``SlotSpec`` and ``SlotPixels`` may travel in light engine messages: importing the
    module loads no torch."""
    code = "import sys, engine.pixel_slots; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# Across processes ------------------------------------------------------------------------------


def run_child_write(spec: SlotSpec, index: int, seed: int) -> SlotPixels:
    """Run ``attach_and_write`` in a plain ``python -c`` process (its own resource tracker)."""
    code = textwrap.dedent(f"""
        import pickle, sys
        from engine.pixel_slots import SlotSpec
        from tests.engine.slot_children import attach_and_write
        spec = SlotSpec({spec.name!r}, {spec.count}, {spec.slot_bytes})
        sys.stdout.buffer.write(pickle.dumps(attach_and_write(spec, {index}, {seed})))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, cwd=ROOT, env=env)
    return pickle.loads(out.stdout)


def test_a_separate_process_writes_what_the_parent_reads_and_leaves_the_segment():
    """A process that attaches with the spec writes a tensor the parent reads back
    identically; its exit (and its resource tracker's) leaves the segment in place; the
    parent's exit unlinks it."""
    with SlotPool.create(2, 256 * KIB) as pool:
        pixels = run_child_write(pool.spec, 1, seed=7)
        assert segment_exists(pool.spec)
        assert torch.equal(pool.memory.read(pixels), seeded_tensor(7))
        pixels = run_child_write(pool.spec, 0, seed=8)  # the segment is still usable
        assert torch.equal(pool.memory.read(pixels), seeded_tensor(8))
    assert not segment_exists(pool.spec)


def test_a_spawned_child_sharing_the_resource_tracker_leaves_it_untouched():
    """Children started by multiprocessing's spawn (as prep workers are) share the parent's
    resource tracker. After one attached, wrote and exited: the parent's clean exit unlinks
    the segment without a tracker complaint, and a parent that dies without cleaning up
    still has the segment unlinked by its tracker."""
    script = textwrap.dedent("""
        import multiprocessing, os, sys
        import torch
        from engine.pixel_slots import SlotPool
        from tests.engine.slot_children import attach_and_write, seeded_tensor

        if __name__ == "__main__":
            with SlotPool.create(2, 256 * 1024) as pool:
                print(pool.spec.name, flush=True)
                with multiprocessing.get_context("spawn").Pool(1) as children:
                    pixels = children.apply(attach_and_write, (pool.spec, 1, 5))
                assert os.path.exists("/dev/shm/" + pool.spec.name)
                assert torch.equal(pool.memory.read(pixels), seeded_tensor(5))
                print("read", flush=True)
                if sys.argv[1] == "die":
                    os._exit(0)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for ending in ("exit", "die"):
        # capture_output waits for the tracker too: it holds the same stderr until it is done
        run = subprocess.run(
            [sys.executable, "-c", script, ending], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr
        name, read = run.stdout.split()
        assert read == "read"
        assert not Path("/dev/shm", name).exists(), ending
        assert "Traceback" not in run.stderr and "KeyError" not in run.stderr, run.stderr


def test_specs_and_pixels_pickle_small():
    spec = SlotSpec("psm_abc", 8, 5 * 1024 * 1024)
    pixels = SlotPixels(3, (1024, 1176), "float32")
    for value in (spec, pixels):
        assert pickle.loads(pickle.dumps(value)) == value
    assert len(pickle.dumps(pixels)) < 200
