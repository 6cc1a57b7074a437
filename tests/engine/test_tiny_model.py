import hashlib

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
