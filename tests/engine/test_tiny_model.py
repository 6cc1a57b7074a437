import hashlib

import pytest
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from engine.tiny_model import build_tiny_model


def digest(path):
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_builder_is_deterministic_and_loads_with_auto_classes(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    assert digest(again) == digest(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(again)
    tokenizer = AutoTokenizer.from_pretrained(again)
    processor = AutoImageProcessor.from_pretrained(again)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert processor.size["longest_edge"] <= 256 * 28 * 28
    rendered = tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "hi"}],
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n" in rendered


def test_greedy_output_varies(tiny_model):
    import torch

    ids = torch.tensor([tiny_model.tokenizer("hello world please describe").input_ids])
    out = tiny_model.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False
    )
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) >= 8


def test_default_model_is_built_once_into_the_user_cache(tmp_path, monkeypatch, tiny_model_dir):
    """``vlserve serve`` without ``--model`` serves the tiny model from the user's cache
    directory, building it there on first use only."""
    from engine.tiny_model import default_tiny_model_dir, ensure_tiny_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    target = default_tiny_model_dir()
    assert str(target).startswith(str(tmp_path / "cache"))
    built = ensure_tiny_model()
    assert built == target and digest(built) == digest(tiny_model_dir)
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model() == target
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging leftovers


def test_real_size_variant_turns_a_1024_photo_into_qwen2_vl_token_counts(real_size_tiny_model_dir, tiny_model_dir):
    """Built with Qwen2-VL's default image limits, the tiny model's processor makes a 1024²
    image into a 74x74 patch grid (5,476 vision patches, 1,369 image tokens, as a real
    Qwen2-VL checkpoint does); only the image-processor config differs from the default
    build, and the language model's positions hold that prompt plus 32 output tokens."""
    import json

    from PIL import Image
    from transformers import AutoConfig

    from engine.tiny_model import QWEN2_VL_DEFAULT_IMAGE_LIMITS

    processor = AutoImageProcessor.from_pretrained(real_size_tiny_model_dir)
    assert processor.size["longest_edge"] == QWEN2_VL_DEFAULT_IMAGE_LIMITS.max_pixels == 12845056
    assert processor.size["shortest_edge"] == QWEN2_VL_DEFAULT_IMAGE_LIMITS.min_pixels == 3136
    out = processor(images=[Image.new("RGB", (1024, 1024), (90, 120, 200))], return_tensors="pt")
    grid = out["image_grid_thw"][0].tolist()
    assert grid == [1, 74, 74]
    patches = grid[0] * grid[1] * grid[2]
    assert out["pixel_values"].shape[0] == patches == 5476
    image_tokens = patches // processor.merge_size**2
    assert image_tokens == 1369
    config = AutoConfig.from_pretrained(real_size_tiny_model_dir)
    assert config.text_config.max_position_embeddings >= image_tokens + 64 + 32

    differing = sorted(
        f.name for f in real_size_tiny_model_dir.iterdir() if f.read_bytes() != (tiny_model_dir / f.name).read_bytes()
    )
    assert differing == ["preprocessor_config.json"]
    default_limits = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert default_limits["max_pixels"] == 256 * 28 * 28  # the default build is unchanged


def test_real_size_variant_has_its_own_cache_directory(tmp_path, monkeypatch):
    from engine.tiny_model import default_tiny_model_dir, image_limits_named

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_tiny_model_dir().name == "tiny-qwen2-vl-v1"
    assert default_tiny_model_dir("qwen2-vl-default").name == "tiny-qwen2-vl-v1-qwen2-vl-default"
    with pytest.raises(ValueError, match="qwen2-vl-default"):
        image_limits_named("huge")
