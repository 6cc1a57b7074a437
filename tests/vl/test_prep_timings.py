"""``ChatPreparer`` fills one ``PrepTimings`` per chat: each stage and each gate wait, as
measured (here on trio's mock clock, with a runner that stands in for the gates' workers)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from engine.pixel_slots import SlotPixels, SlotPool
from vl.chat_messages import Chat, ImagePart, Message, TextPart
from vl.chat_preparer import ChatPreparer
from vl.gates import BorrowTimes, Gate, TimedBorrow
from vl.image_pixels import SlotImage
from vl.media_policy import MediaPolicy
from vl.prep_timings import PrepTimings
from vl.prep_tools import ImagePixels, RenderChat

IMAGE_TOKEN_ID = 7
POLL_S = 0.001


class FakeTokenizer:
    def convert_tokens_to_ids(self, token: str) -> int:
        return IMAGE_TOKEN_ID


class FakePreprocessor:
    settings_key = "fake"
    merge_size = 1


class FakeTools:
    policy = MediaPolicy()
    tokenizer = FakeTokenizer()
    preprocessor = FakePreprocessor()


class FakeFetcher:
    """An HTTP fetch that takes 2 s, the first 0.75 s waiting for its limiter's slot."""

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(1)

    async def fetch(self, url: str, *, param: str, times: BorrowTimes | None = None) -> bytes:
        async def hold_briefly() -> None:
            async with self.limiter:
                await trio.sleep(0.75)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_briefly)
            await trio.testing.wait_all_tasks_blocked()
            async with TimedBorrow(self.limiter, times):
                await trio.sleep(1.25)
        return b"not decoded here"


class TimedRunner:
    """Each step waits ``wait`` s for its gate, then holds it ``hold`` s; an image's decode
    and preprocess times come back on its ``SlotImage`` as a worker would report them."""

    def __init__(self) -> None:
        self.waits = {"tokenizer": 1.0, "image_prep": 0.25}
        self.holds = {"tokenizer": 0.5, "image_prep": 0.875}

    async def run(self, gate: Gate, step, times: BorrowTimes | None = None):
        times = times or BorrowTimes()
        times.asked = trio.current_time()
        await trio.sleep(self.waits[gate.name])
        times.acquired = trio.current_time()
        await trio.sleep(self.holds[gate.name])
        times.released = trio.current_time()
        if isinstance(step, RenderChat):
            return [1, IMAGE_TOKEN_ID, 2]
        assert isinstance(step, ImagePixels)
        pixels = SlotPixels(step.slot_index, (4, 6), "float32")
        return SlotImage(pixels, (1, 2, 2), 4, decode_seconds=0.5, preprocess_seconds=0.25)


@pytest.fixture
def pool():
    with SlotPool.create(1, 4096) as pool:
        yield pool


async def test_a_chat_reports_each_stage_and_each_gate_wait(autojump_clock, pool):
    """Fetch 2 s (0.75 s of it waiting for the fetch limiter), a pixel slot held elsewhere for 3 s after the image asks for one, the
    runner's gate waits and holds, the worker's decode and preprocess times: each lands in
    the prompt's ``PrepTimings`` under its name, and the summary adds them up in ms."""
    preparer = ChatPreparer(
        tools=FakeTools(),
        fetcher=FakeFetcher(),
        image_gate=Gate("image_prep", 1),
        tokenizer_gate=Gate("tokenizer", 1),
        slots=pool,
        image_token="<image>",
        runner=TimedRunner(),
    )
    chat = Chat((Message("user", (ImagePart("http://images.test/a.png"), TextPart("what?"))),))
    held_elsewhere = await pool.acquire()
    prepared = []
    async with trio.open_nursery() as nursery:

        async def prepare() -> None:
            prepared.append(await preparer.prepare_chat(chat))

        nursery.start_soon(prepare)
        while pool.statistics().waiting == 0:  # fetch (2 s), then hashing (a thread)
            await trio.sleep(POLL_S)
        await trio.sleep(3)
        held_elsewhere.release()
    [result] = prepared
    timings = result.timings
    assert isinstance(timings, PrepTimings)
    assert sorted(timings.stages) == sorted([("fetch", 2.0), ("tokenize", 0.5), ("decode", 0.5), ("preprocess", 0.25)])
    waits = dict(timings.gate_waits)
    assert waits.keys() == {"tokenizer", "pixel_slots", "image_prep", "fetch"}
    assert waits["tokenizer"] == 1.0 and waits["image_prep"] == 0.25 and waits["fetch"] == 0.75
    assert 3.0 <= waits["pixel_slots"] <= 3.0 + POLL_S + 1e-9  # the test saw the ask within one poll
    summary = timings.summary_ms()
    assert summary.pop("gate_wait_ms") == pytest.approx(1000 * (2.0 + waits["pixel_slots"]))
    assert summary == {"fetch_ms": 2000.0, "decode_ms": 500.0, "preprocess_ms": 250.0, "tokenize_ms": 500.0}
    result.lease.release_creator()
    assert pool.statistics().free == 1
