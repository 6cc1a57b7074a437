"""Preparation in prep worker processes: same results as in threads, same gate invariants."""

from __future__ import annotations

import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import trio
import trio.lowlevel
import trio_parallel
from PIL import Image

from engine.malloc_tunables import WORKER_MALLOC_TUNABLES
from engine.pixel_slots import SlotPool
from tests.engine.prompts import noise_image
from tests.helpers.freed_block import freed_block
from tests.helpers.fresh_interpreter import run_fresh
from tests.vl.process_work import announce_then_wait, modules_loaded
from vl.errors import MediaError
from vl.gates import Gate
from vl.image_pixels import ImagePreprocessor
from vl.image_source import EncodedImage
from vl.media_policy import MediaPolicy
from vl.prep_processes import ProcessPrep
from vl.prep_tools import (
    Detokenize,
    ImagePixels,
    PrepTools,
    PrepToolsSpec,
    RenderChat,
    RenderChats,
    ThreadPrep,
    Tokenize,
)
from vl.qwen2_vl_pixels import PixelSettings
from vl.text_tokenizer import TokenizerSnapshot


async def wait_for_path(path) -> None:
    with trio.fail_after(30):
        while not path.exists():
            await trio.sleep(0.01)


async def test_cancelled_requester_keeps_token_until_its_process_returns(tmp_path):
    """Invariant: a requester cancelled while its call runs in a worker process keeps the
    gate's token until the process returns (the work runs to its end); waiters queued behind
    it and cancelled never start their work; afterwards the gate is full and idle."""
    gate = Gate("prep", 1)
    started, release = tmp_path / "started", tmp_path / "release"
    finished = trio.Event()
    outcome: list[str] = []

    async def requester(scope: trio.CancelScope) -> None:
        with scope:
            outcome.append(await gate.run_in_process(context, announce_then_wait, str(started), str(release)))
            finished.set()
            await trio.lowlevel.checkpoint()
            outcome.append("not cancelled")

    async def waiter(i: int) -> None:
        with trio.CancelScope() as scope:
            waiting.append(scope)
            await gate.run_in_process(context, announce_then_wait, str(tmp_path / f"waiter-{i}"), str(release))

    async with trio_parallel.open_worker_context() as context:
        first, waiting = trio.CancelScope(), []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requester, first)
            await wait_for_path(started)
            for i in range(5):
                nursery.start_soon(waiter, i)
            await trio.sleep(0.1)
            assert gate.statistics().waiting == 5
            first.cancel()
            for scope in waiting:
                scope.cancel()
            await trio.sleep(0.2)
            assert not finished.is_set()  # still waiting for its process
            assert gate.statistics().borrowed == 1
            release.touch()
            await finished.wait()
    assert first.cancelled_caught and all(scope.cancelled_caught for scope in waiting)
    assert outcome == ["done"]  # the work finished; Cancelled came at the next checkpoint
    assert not any((tmp_path / f"waiter-{i}").exists() for i in range(5))
    stats = gate.statistics()
    assert (stats.borrowed, stats.waiting, stats.completed) == (0, 0, 1)


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def spec(tiny_model_dir, tiny_model):
    return PrepToolsSpec(str(tiny_model_dir), MediaPolicy(), tiny_model.adapter.spatial_merge_size)


@pytest.fixture
def pool():
    with SlotPool.create(2, 8 << 20) as pool:
        yield pool


@pytest.fixture
def local_tools(tiny_model, spec, pool):
    preprocessor = ImagePreprocessor(tiny_model.image_processor, spec.merge_size)
    return PrepTools(tiny_model.tokenizer, spec.policy, preprocessor, slot_memories=[pool.memory])


def server_spec(tiny_model, tiny_model_dir) -> PrepToolsSpec:
    """The spec the server gives its prep processes: pixel settings and tokenizer snapshot."""
    settings = PixelSettings.of(tiny_model.image_processor)
    snapshot = TokenizerSnapshot.of(tiny_model.tokenizer)
    assert settings is not None and snapshot is not None
    return PrepToolsSpec(
        str(tiny_model_dir), MediaPolicy(), tiny_model.adapter.spatial_merge_size, settings, tokenizer=snapshot
    )


@pytest.mark.parametrize("form", ["loaded", "server"])
async def test_process_results_equal_thread_results(form, spec, tiny_model, tiny_model_dir, local_tools, pool):
    """Every ``PrepTools`` call gives the same result in a prep process as in a thread, and
    ``open`` leaves as many loaded processes as asked for; so with the tokenizer and the
    image processor loaded there (``loaded``) and with the server's snapshot and settings
    (``server``), where the processes never import torch."""
    if form == "server":
        spec = server_spec(tiny_model, tiny_model_dir)
    messages = [{"role": "user", "content": "hello there, how are you?"}]
    image = EncodedImage(payload=jpeg(noise_image(2, 300, 420)), base64_encoded=False, source="data")
    threads, tokens, images = ThreadPrep(local_tools), Gate("tokenizer", 1), Gate("image_prep", 2)
    async with ProcessPrep.open(spec, workers=2) as processes:
        assert processes.worker_count() == 2
        loaded = await tokens.run_in_process(
            processes.context, modules_loaded, ("torch", "transformers.modeling_utils")
        )
        assert loaded == [] if form == "server" else "torch" in loaded
        results = []
        for slot_index, runner in enumerate((threads, processes)):
            ids = await runner.run(tokens, RenderChat(messages))
            results.append(
                (
                    ids,
                    await runner.run(tokens, Tokenize("plain text", True)),
                    await runner.run(tokens, Detokenize(ids)),
                    await runner.run(images, ImagePixels(image, "messages[0].content[0]", slot_index, pool.spec)),
                )
            )
    (ids_t, enc_t, text_t, pix_t), (ids_p, enc_p, text_p, pix_p) = results
    assert ids_t == ids_p and enc_t == enc_p and text_t == text_p
    assert "hello there" in text_p
    assert pix_p.grid_thw == pix_t.grid_thw and (pix_t.pixels.index, pix_p.pixels.index) == (0, 1)
    assert torch.equal(pool.memory.read(pix_p.pixels), pool.memory.read(pix_t.pixels))
    assert (tokens.statistics().completed, images.statistics().completed) == (7, 2)


async def test_a_batch_of_chats_renders_in_one_process_call_as_each_would_alone(spec, local_tools):
    """``RenderChats`` in a prep process gives every chat the token ids ``RenderChat``
    gives it in a thread, in order, in one call (one gate completion)."""
    chats = [[{"role": "user", "content": text}] for text in ("hello", "a longer question about a picture?", "x")]
    gate = Gate("tokenizer", 1)
    alone = [await ThreadPrep(local_tools).run(gate, RenderChat(messages)) for messages in chats]
    async with ProcessPrep.open(spec, workers=1) as processes:
        together = await processes.run(gate, RenderChats(tuple(chats)))
    assert together == alone and len({tuple(ids) for ids in alone}) == 3
    assert gate.statistics().completed == len(chats) + 1


async def test_errors_in_a_prep_process_keep_param_and_code(spec, local_tools, pool):
    """A ``MediaError`` raised in a prep process reaches the caller as the same class with
    the same message, param and code as in a thread; the process stays usable and the gate
    ends full."""
    gate = Gate("image_prep", 1)
    bad = EncodedImage(b"not an image at all", base64_encoded=False, source="data")
    with pytest.raises(MediaError) as in_thread:
        await ThreadPrep(local_tools).run(gate, ImagePixels(bad, "messages[0].content[1]", 0, pool.spec))
    async with ProcessPrep.open(spec, workers=1) as processes:
        with pytest.raises(MediaError) as in_process:
            await processes.run(gate, ImagePixels(bad, "messages[0].content[1]", 0, pool.spec))
        assert await processes.run(gate, Tokenize("still works", False))
        assert processes.worker_count() == 1
    for attribute in ("message", "param", "code"):
        assert getattr(in_process.value, attribute) == getattr(in_thread.value, attribute)
    assert in_process.value.code == "invalid_image"
    assert gate.statistics().borrowed == 0


async def test_prep_processes_run_at_the_requested_niceness(spec):
    base = os.nice(0)
    async with ProcessPrep.open(spec, workers=1, nice=3) as processes:
        assert await processes.context.run_sync(os.nice, 0) == min(base + 3, 19)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(("tunables", "heap_keeps_it"), [(WORKER_MALLOC_TUNABLES, True), ("", False)])
async def test_prep_processes_start_with_the_malloc_tunables(spec, monkeypatch, tunables, heap_keeps_it):
    """A prep process applies ``malloc_tunables`` when it starts: with the default a freed
    25 MiB block (a real-size image's pixels) comes from its heap and stays there for the
    next image; with '' glibc's own behaviour gives it back to the kernel."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)  # the processes inherit this environment
    async with ProcessPrep.open(spec, workers=1, malloc_tunables=tunables) as processes:
        freed = await processes.context.run_sync(freed_block)
    # kept: (0, 0); glibc's own: mmapped, or the heap grown for it and trimmed again
    assert (freed == (0, 0)) == heap_keeps_it


async def test_a_dead_prep_process_fails_only_its_call_and_is_replaced(spec):
    """A prep process that dies mid-call (killed, crashed) fails that call with
    ``BrokenWorkerError``; the gate token comes back and the next call runs in a fresh
    process with its tools loaded."""
    gate = Gate("tokenizer", 1)
    async with ProcessPrep.open(spec, workers=1) as processes:
        with pytest.raises(trio_parallel.BrokenWorkerError):
            await gate.run_in_process(processes.context, os._exit, 3)
        assert gate.statistics().borrowed == 0
        assert await processes.run(gate, Tokenize("after the crash", False))
        assert processes.worker_count() == 1


def test_prep_tools_from_pixel_settings_leave_the_image_processor_unloaded(tiny_model, tiny_model_dir):
    """A prep process given the server's ``PixelSettings`` builds its tools without loading
    the image processor, so transformers' image-processing modules (and the torch compiler
    stack they import, ~78 MiB a process) are never imported there; its pixels equal the
    server's preprocessor's. Checked in a fresh interpreter, as a prep process starts."""
    settings = PixelSettings.of(tiny_model.image_processor)
    assert settings is not None
    spec = PrepToolsSpec(str(tiny_model_dir), MediaPolicy(), tiny_model.adapter.spatial_merge_size, settings)
    script = (
        "import pickle, sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "spec = pickle.loads(sys.stdin.buffer.read())\n"
        "tools = spec.load()\n"
        "image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(200, 300, 3) * 7, 'RGB')\n"
        "out = tools.preprocessor(image)\n"
        "loaded = [m for m in ('transformers.image_processing_utils', 'torch._dynamo') if m in sys.modules]\n"
        "sys.stdout.buffer.write(pickle.dumps((loaded, out.pixel_values, out.grid_thw, len(tools.encode('hi', False)))))\n"
    )
    loaded, pixel_values, grid, tokens = pickle.loads(run_fresh(script, pickle.dumps(spec)))
    assert loaded == [] and tokens >= 1
    image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(200, 300, 3) * 7, "RGB")
    expected = ImagePreprocessor(tiny_model.image_processor, tiny_model.adapter.spatial_merge_size)(image)
    assert grid == expected.grid_thw and np.array_equal(pixel_values, expected.pixel_values)


def test_the_server_spec_prepares_a_chat_without_torch(tiny_model, tiny_model_dir, local_tools, pool):
    """With the server's spec (pixel settings, tokenizer snapshot handed over beside it as
    a prep process gets it) a fresh interpreter renders, tokenizes, detokenizes and writes
    an image's pixels into a slot without importing torch or transformers' model, config
    or image-processing modules, and every result equals the server's own tools'; the
    spec pickles without the snapshot."""
    spec = server_spec(tiny_model, tiny_model_dir)
    assert pickle.loads(pickle.dumps(spec)).tokenizer is None and len(pickle.dumps(spec)) < 16_000
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image"}]}]
    image = EncodedImage(payload=jpeg(noise_image(3, 280, 350)), base64_encoded=False, source="data")
    script = (
        "import dataclasses, pickle, sys\n"
        "spec, snapshot, messages, image, slots = pickle.loads(sys.stdin.buffer.read())\n"
        "tools = dataclasses.replace(spec, tokenizer=snapshot).load()\n"
        "ids = tools.render_and_tokenize(messages)\n"
        "out = (ids, tools.encode('plain text', True), tools.decode(ids), tools.pixels_into_slot(image, 'p', 1, slots))\n"
        "loaded = [m for m in ('torch', 'transformers.configuration_utils', 'transformers.modeling_utils',"
        " 'transformers.image_processing_utils') if m in sys.modules]\n"
        "sys.stdout.buffer.write(pickle.dumps((loaded, out)))\n"
    )
    payload = pickle.dumps((spec, spec.tokenizer, messages, image, pool.spec))
    loaded, (ids, encoded, text, written) = pickle.loads(run_fresh(script, payload))
    assert loaded == []
    assert ids == local_tools.render_and_tokenize(messages)
    assert encoded == local_tools.encode("plain text", True) and text == local_tools.decode(ids)
    expected = local_tools.pixels_into_slot(image, "p", 0, pool.spec)
    assert written.grid_thw == expected.grid_thw and written.pixels.shape == expected.pixels.shape
    assert torch.equal(pool.memory.read(written.pixels), pool.memory.read(expected.pixels))
