"""A front end with the engine in its worker process reads no weights (the engine worker
runs the vision encoder); with the engine in threads, image encoding is part of a step,
under the device gate."""

from __future__ import annotations

import torch
import trio
import trio.testing

from engine.config import EngineConfig
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from engine.thread_core import ThreadCore
from server.config import ServerConfig
from server.runtime import open_runtime
from tests.engine.prompts import noise_image
from tests.engine.streams import wait_until_idle
from tests.engine.test_model_families import save_qwen2_causal
from tests.vl.test_chat_preparer import data_uri, image_message


def weight_devices(model: torch.nn.Module) -> set[str]:
    return {p.device.type for p in model.parameters()}


def test_a_load_without_weights_keeps_config_limits_and_processors(tiny_model, tiny_model_dir):
    """No weight is read (every parameter is on the meta device); what a front end needs
    (limits, stop ids, image support, merge size, tokenizer, image processor) equals the
    full load's."""
    light = load_model(tiny_model_dir, weights=False)
    assert weight_devices(light.model) == {"meta"}
    assert (light.max_model_len, light.eos_token_ids, light.supports_images) == (
        tiny_model.max_model_len,
        tiny_model.eos_token_ids,
        True,
    )
    assert light.adapter.spatial_merge_size == tiny_model.adapter.spatial_merge_size
    assert light.tokenizer("hello").input_ids == tiny_model.tokenizer("hello").input_ids
    assert light.image_processor.to_dict() == tiny_model.image_processor.to_dict()


def test_a_load_without_weights_of_a_text_model(tmp_path):
    loaded = load_model(save_qwen2_causal(tmp_path / "qwen2"), weights=False)
    assert weight_devices(loaded.model) == {"meta"}
    assert loaded.eos_token_ids and loaded.max_model_len > 0 and not loaded.supports_images


async def test_runtime_with_engine_process_reads_no_weights(tiny_model_dir):
    """A runtime that loads its own model with the engine in a worker process holds no
    weights in the server process, and still serves an image prompt end to end (encoded
    by the engine worker)."""
    config = ServerConfig(model=str(tiny_model_dir))
    async with open_runtime(config) as runtime:
        assert weight_devices(runtime.loaded.model) == {"meta"}
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
