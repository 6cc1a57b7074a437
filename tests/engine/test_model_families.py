"""Other model families load through the same loader and batch like ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
import trio

from engine.async_engine import open_engine
from engine.model_loader import ModelLoadError, load_model
from engine.sampling_params import SamplingParams
from engine.tiny_model import _fan_in_init, build_config, build_tokenizer
from tests.engine.configs import in_thread
from tests.engine.prompts import chat_prompt, noise_image, reference_generate


def save_causal_lm(path, config_class, model_class):
    """A tiny causal LM of ``model_class`` (64 wide, 2 layers, grouped-query heads) with
    the tiny model's tokenizer, saved to ``path``."""
    tokenizer = build_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = model_class(config)
    _fan_in_init(model, torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_qwen2_causal(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return save_causal_lm(path, Qwen2Config, Qwen2ForCausalLM)


def save_qwen25_vl(path, tiny_model_dir):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    base = build_config(tokenizer).to_dict()
    vision = dict(
        depth=2,
        hidden_size=32,
        out_hidden_size=64,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=base["text_config"],
        vision_config=vision,
        image_token_id=base["image_token_id"],
        video_token_id=base["video_token_id"],
        vision_start_token_id=base["vision_start_token_id"],
        vision_end_token_id=base["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _fan_in_init(model, torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text((tiny_model_dir / "preprocessor_config.json").read_text())
    return path


async def greedy(loaded, prompts, n):
    out = [None] * len(prompts)
    async with open_engine(loaded, in_thread()) as engine:

        async def run(i):
            ids = []
            async with engine.open_stream(prompts[i], SamplingParams(max_tokens=n, temperature=0)) as stream:
                async for delta in stream:
                    ids += delta.token_ids
            out[i] = ids

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(run, i)
    return out


async def test_plain_causal_lm_batches_like_generate(tmp_path):
    loaded = load_model(save_qwen2_causal(tmp_path / "qwen2"))
    assert not loaded.supports_images
    built = [chat_prompt(loaded, t) for t in ("hello world", "one two three four five six", "a")]
    got = await greedy(loaded, [p for p, _ in built], 12)
    assert got == [reference_generate(loaded, p, extra, 12) for p, extra in built]


async def test_qwen25_vl_batches_like_generate(tmp_path, tiny_model_dir):
    loaded = load_model(save_qwen25_vl(tmp_path / "qwen25", tiny_model_dir))
    assert loaded.supports_images
    built = [chat_prompt(loaded, "describe", noise_image(1, 200, 300)), chat_prompt(loaded, "hello world")]
    got = await greedy(loaded, [p for p, _ in built], 10)
    assert got == [reference_generate(loaded, p, extra, 10) for p, extra in built]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "not a directory"),
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), "cannot read"),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]})),
            ),
            "unsupported architecture",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / "config.json").write_text(
                    json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
                ),
            ),
            "cannot load",
        ),
    ],
)
def test_bad_model_directories_give_one_line_errors(tmp_path, setup, message):
    path = tmp_path / "m"
    setup(path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
