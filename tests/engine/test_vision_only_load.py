"""A front end with the engine in its worker process keeps only the vision tower; with
the engine in threads, its steps share the vision encoder's device gate."""

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
from vl.image_pixels import ImagePreprocessor


def parameter_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def test_vision_only_load_keeps_the_vision_tower_and_its_results(tiny_model, tiny_model_dir):
    """Only ``model.visual`` weights remain; image features, context length and stop ids
    equal those of the full load."""
    vision = load_model(tiny_model_dir, language_model=False)
    names = parameter_names(vision.model)
    assert names and all(name.startswith("model.visual.") for name in names)
    assert len(names) < len(parameter_names(tiny_model.model))
    pixels = ImagePreprocessor(tiny_model.image_processor, tiny_model.adapter.spatial_merge_size)(
        noise_image(4, 96, 128)
    )
    [full] = tiny_model.adapter.encode_images(pixels.pixel_values, [pixels.grid_thw])
    [only] = vision.adapter.encode_images(pixels.pixel_values, [pixels.grid_thw])
    assert torch.equal(full.embeddings, only.embeddings)
    assert (vision.max_model_len, vision.eos_token_ids, vision.supports_images) == (
        tiny_model.max_model_len,
        tiny_model.eos_token_ids,
        True,
    )


def test_vision_only_load_of_a_text_model_keeps_no_weights(tmp_path):
    loaded = load_model(save_qwen2_causal(tmp_path / "qwen2"), language_model=False)
    assert parameter_names(loaded.model) == []
    assert loaded.eos_token_ids and loaded.max_model_len > 0


async def test_runtime_with_engine_process_loads_no_second_language_model(tiny_model_dir):
    """A runtime that loads its own model with the engine in a worker process holds only
    the vision tower in the server process, and still serves an image prompt end to end."""
    config = ServerConfig(model=str(tiny_model_dir))
    async with open_runtime(config) as runtime:
        assert all(name.startswith("model.visual.") for name in parameter_names(runtime.loaded.model))
        prompt = await runtime.preparer.prepare_chat(image_message(data_uri(noise_image(5, 80, 80))))
        async with runtime.engine.open_stream(prompt, SamplingParams(max_tokens=4, temperature=0)) as stream:
            tokens = [t async for delta in stream for t in delta.token_ids]
    assert len(tokens) == 4


async def test_runtime_without_engine_process_steps_under_the_encoder_gate(tiny_model):
    """``--no-engine-process``: the runtime's engine steps in threads under the same device
    gate as the vision encoder: while the gate is held no step runs; released, the image
    request completes and the gate is free again."""
    config = ServerConfig(engine=EngineConfig(in_worker_process=False))
    async with open_runtime(config, loaded=tiny_model) as runtime:
        assert isinstance(runtime.engine.core, ThreadCore)
        prompt = await runtime.preparer.prepare_chat(image_message(data_uri(noise_image(5, 80, 80))))
        tokens = []
        async with trio.open_nursery() as nursery:
            async with runtime.device_gate:

                async def generate():
                    params = SamplingParams(max_tokens=4, temperature=0)
                    async with runtime.engine.open_stream(prompt, params) as stream:
                        tokens.extend([t async for delta in stream for t in delta.token_ids])

                nursery.start_soon(generate)
                await trio.testing.wait_all_tasks_blocked()
                assert runtime.device_gate.statistics().tasks_waiting == 1
                assert runtime.engine.statistics().steps == 0
        assert len(tokens) == 4
        await wait_until_idle(runtime.engine)
        assert runtime.device_gate.borrowed_tokens == 0
