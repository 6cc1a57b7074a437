"""Build engine prompts for tests straight from the tokenizer and image processor."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.prompt import EnginePrompt


def noise_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def chat_prompt(loaded, text: str, image: Image.Image | None = None):
    """Return (EnginePrompt, generate() kwargs) for one user message."""
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": "unused"}})
    rendered = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    extra = {}
    images = []
    if image is not None:
        processed = loaded.image_processor(images=[image], return_tensors="pt")
        grid = processed["image_grid_thw"]
        n = int(grid.prod()) // loaded.adapter.spatial_merge_size**2
        rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * n)
        images = loaded.adapter.encode_images(processed["pixel_values"], [tuple(grid[0].tolist())])
        extra = {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}
    ids = loaded.tokenizer(rendered).input_ids
    if image is not None:
        tensor = torch.tensor([ids])
        extra["mm_token_type_ids"] = (tensor == loaded.model.config.image_token_id).int()
    return EnginePrompt(ids, images), extra


def reference_generate(loaded, prompt: EnginePrompt, extra: dict, max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` for one request alone."""
    ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **extra,
        )
    return out[0, ids.shape[1] :].tolist()
