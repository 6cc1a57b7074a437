"""A front end with the engine in its worker process builds no model (the engine worker
runs it, vision encoder included): it reads a ``ModelCard``; with the engine in threads,
image encoding is part of a step, under the device gate."""

from __future__ import annotations

import shutil

import pytest
import trio
import trio.testing

from engine.config import EngineConfig
from engine.errors import ModelLoadError
from engine.model_loader import LoadedModel, ModelCard, load_model, load_model_card
from engine.sampling_params import SamplingParams
from engine.thread_core import ThreadCore
from server.config import ServerConfig
from server.runtime import open_runtime
from tests.engine.prompts import noise_image
from tests.engine.streams import wait_until_idle
from tests.engine.test_model_families import save_qwen2_causal
from tests.helpers.fresh_interpreter import run_fresh
from tests.vl.process_work import modules_loaded
from tests.vl.test_chat_preparer import data_uri, image_message
from vl.gates import Gate
from vl.prep_processes import ProcessPrep
from vl.text_tokenizer import TextTokenizer


def test_a_model_card_has_what_the_full_load_has_for_a_front_end(tiny_model, tiny_model_dir):
    """A card (no model built) has the full load's limits, stop ids, image support, merge
    size, device, dtype and tokenizer."""
    card = load_model_card(tiny_model_dir)
    assert not isinstance(card, LoadedModel)
    assert (card.max_model_len, card.eos_token_ids, card.supports_images, card.spatial_merge_size) == (
        tiny_model.max_model_len,
        tiny_model.eos_token_ids,
        True,
        tiny_model.adapter.spatial_merge_size,
    )
    assert (card.device, card.dtype) == (str(tiny_model.device), "float32")  # names: a card needs no torch
    assert (card.device_type, card.dtype_name) == (tiny_model.device_type, tiny_model.dtype_name) == ("cpu", "float32")
    assert card.tokenizer("hello").input_ids == tiny_model.tokenizer("hello").input_ids
    assert load_model_card(tiny_model_dir, max_model_len=100).max_model_len == 100


def test_a_model_card_of_a_text_model(tmp_path):
    directory = save_qwen2_causal(tmp_path / "qwen2")
    card, full = load_model_card(directory), load_model(directory)
    assert (card.eos_token_ids, card.max_model_len) == (full.eos_token_ids, full.max_model_len)
    assert card.eos_token_ids and not card.supports_images and card.spatial_merge_size is None


def test_a_model_card_refuses_what_the_full_load_refuses(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model_card(tmp_path)
    vision = tmp_path / "no-processor"
    shutil.copytree(tiny_model_dir, vision)
    (vision / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="preprocessor_config"):
        load_model_card(vision)


def test_a_front_end_imports_no_modelling_or_image_processing(tiny_model_dir):
    """In a fresh interpreter (as ``vlserve serve`` starts), the card and the image
    preprocessor of the tiny model import none of transformers' modelling or image
    processing, nor torch's compiler stack (~80 MiB and seconds of start-up), and the
    preprocessor takes the fast path."""
    script = (
        "import sys\n"
        "from engine.model_loader import load_model_card\n"
        "from vl.image_pixels import load_image_preprocessor\n"
        f"card = load_model_card({str(tiny_model_dir)!r})\n"
        "preprocessor = load_image_preprocessor(card.path, card.spatial_merge_size)\n"
        "heavy = ('transformers.modeling_utils', 'transformers.image_processing_utils', 'torch._dynamo', 'sympy')\n"
        "print([m for m in heavy if m in sys.modules], preprocessor.pixel_settings is not None)\n"
    )
    assert run_fresh(script).decode().split("\n")[-2] == "[] True"


async def test_runtime_with_engine_process_reads_no_weights(tiny_model_dir):
    """A runtime that loads its own model with the engine in a worker process holds no
    weights in the server process, and still serves an image prompt end to end (encoded
    by the engine worker)."""
    config = ServerConfig(model=str(tiny_model_dir))
    async with open_runtime(config) as runtime:
        assert isinstance(runtime.loaded, ModelCard) and not isinstance(runtime.loaded, LoadedModel)
        assert isinstance(runtime.loaded.tokenizer, TextTokenizer)  # read in a passing process (server.front_card)
        # nor do its prep processes, which got the tokenizer's snapshot (vl.text_tokenizer)
        runner = runtime.preparer.runner
        assert isinstance(runner, ProcessPrep)
        gate = Gate("check", 1)
        assert await gate.run_in_process(runner.context, modules_loaded, ("torch", "transformers.modeling_utils")) == []
        prepared = await runtime.preparer.prepare_chat(image_message(data_uri(noise_image(5, 80, 80))))
        params = SamplingParams(max_tokens=4, temperature=0)
        try:
            async with runtime.engine.open_stream(prepared.prompt, params, prepared.lease) as stream:
                tokens = [t async for delta in stream for t in delta.token_ids]
        finally:
            prepared.lease.release_creator()
        await wait_until_idle(runtime.engine)
        assert runtime.engine.statistics().images_encoded == 1
        assert runtime.slots.statistics().free == runtime.slots.statistics().total
    assert len(tokens) == 4


async def test_runtime_without_engine_process_encodes_inside_steps_under_the_device_gate(tiny_model):
    """``--no-engine-process``: the runtime's engine steps (image encoding included) in
    threads under the device gate: while the gate is held no step runs (beyond the
    runtime's warm-up) and no image is encoded; released, the image request completes and the gate is free again."""
    config = ServerConfig(engine=EngineConfig(in_worker_process=False))
    async with open_runtime(config, loaded=tiny_model) as runtime:
        assert isinstance(runtime.engine.core, ThreadCore)
        prepared = await runtime.preparer.prepare_chat(image_message(data_uri(noise_image(5, 80, 80))))
        tokens = []
        async with trio.open_nursery() as nursery:
            async with runtime.device_gate:
                await trio.testing.wait_all_tasks_blocked()  # the warm-up's last outputs delivered
                before = runtime.engine.statistics()

                async def generate():
                    params = SamplingParams(max_tokens=4, temperature=0)
                    async with runtime.engine.open_stream(prepared.prompt, params, prepared.lease) as stream:
                        tokens.extend([t async for delta in stream for t in delta.token_ids])

                nursery.start_soon(generate)
                await trio.testing.wait_all_tasks_blocked()
                assert runtime.device_gate.statistics().tasks_waiting == 1
                assert runtime.engine.statistics().steps == before.steps  # none while the gate is held
                assert runtime.engine.statistics().images_encoded == 0
        prepared.lease.release_creator()
        assert len(tokens) == 4
        await wait_until_idle(runtime.engine)
        assert runtime.device_gate.borrowed_tokens == 0
        assert runtime.engine.statistics().images_encoded == 1
        assert runtime.slots.statistics().free == runtime.slots.statistics().total
