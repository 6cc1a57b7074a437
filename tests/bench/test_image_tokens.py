"""The benchmark's image-token setting (bench/workloads/image_tokens.py): the token and patch
counts it prints are the image processor's own, and vlserve's pixel slots hold the images."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoImageProcessor

from bench.launch.servers import vlserve_pixel_slot_args
from bench.workloads.image_tokens import ImageTokenSetting


@pytest.mark.parametrize("size", [512, 1024, 1500])
def test_real_counts_are_what_the_real_size_model_makes(real_size_tiny_model_dir, size):
    processor = AutoImageProcessor.from_pretrained(real_size_tiny_model_dir)
    out = processor(images=[Image.new("RGB", (size, size), (10, 200, 30))], return_tensors="pt")
    patches = int(out["image_grid_thw"][0].prod())
    setting = ImageTokenSetting("real")
    assert setting.patches(size) == patches
    assert setting.image_tokens(size) == patches // processor.merge_size**2
    # the slot flag the benchmark gives vlserve holds these pixel values, one frame per
    # patch (the processor repeats it over its temporal patch of 2; vl/qwen2_vl_pixels.py)
    assert setting.pixel_slot_mb(size) * 2**20 >= out["pixel_values"].numel() * 4 // processor.temporal_patch_size


def test_real_1024_is_qwen2_vl_sized_and_256_keeps_todays_cap(tiny_model_dir):
    real, capped = ImageTokenSetting("real"), ImageTokenSetting("256")
    assert (real.image_tokens(1024), real.patches(1024), real.pixel_slot_mb(1024)) == (1369, 5476, 16)
    assert vlserve_pixel_slot_args(real.pixel_slot_mb(1024)) == ("--pixel-slot-mb", "16")
    assert (
        capped.image_tokens(1024)
        == 256
        == AutoImageProcessor.from_pretrained(tiny_model_dir).size["longest_edge"] // 28**2
    )
    assert capped.pixel_slot_mb(1024) is None and vlserve_pixel_slot_args(None) == ()
    assert "1,369 image tokens" in real.describe(1024) and "--pixel-slot-mb 16" in real.describe(1024)
    with pytest.raises(ValueError, match="256, real"):
        ImageTokenSetting("huge")
