"""The vision tower's patch convolution computed as one matrix product (engine/patch_embed.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from engine.patch_embed import LinearPatchProjection, is_patch_convolution, use_linear_patch_projection


def _patch_conv(bias: bool = False) -> torch.nn.Conv3d:
    torch.manual_seed(0)
    return torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_the_product_equals_the_convolution_on_whole_patches(bias):
    conv = _patch_conv(bias)
    patches = torch.randn(37, 3, 2, 14, 14)
    with torch.inference_mode():
        expected = conv(patches)
        got = LinearPatchProjection(conv)(patches)
    assert got.shape == expected.shape == (37, 8, 1, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_input_of_another_shape_goes_through_the_convolution():
    conv = _patch_conv()
    larger = torch.randn(2, 3, 4, 28, 28)  # several patches per input: not one product
    with torch.inference_mode():
        torch.testing.assert_close(LinearPatchProjection(conv)(larger), conv(larger))


def test_only_convolutions_over_whole_non_overlapping_patches_qualify():
    assert is_patch_convolution(_patch_conv())
    overlapping = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(1, 7, 7))
    padded = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), padding=1)
    grouped = torch.nn.Conv3d(3, 6, kernel_size=(2, 14, 14), stride=(2, 14, 14), groups=3)
    for conv in (overlapping, padded, grouped, torch.nn.Linear(4, 4)):
        assert not is_patch_convolution(conv)
        with pytest.raises(ValueError):
            LinearPatchProjection(conv)  # type: ignore[arg-type]


def test_a_tower_without_a_patch_convolution_is_left_alone():
    tower = torch.nn.Module()
    tower.patch_embed = torch.nn.Module()
    tower.patch_embed.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(1, 7, 7))
    before = tower.patch_embed.proj
    assert use_linear_patch_projection(tower) is False
    assert tower.patch_embed.proj is before
    assert use_linear_patch_projection(torch.nn.Module()) is False


def test_the_served_tiny_model_encodes_as_the_unpatched_model_does(tiny_model, tiny_model_dir):
    """The adapter swaps the projection in (sharing the weight), and the real vision tower's
    features for two images equal those of the model as transformers loads it."""
    visual = tiny_model.model.model.visual
    assert isinstance(visual.patch_embed.proj, LinearPatchProjection)
    assert use_linear_patch_projection(visual) is True  # idempotent
    reference = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert isinstance(reference.model.visual.patch_embed.proj, torch.nn.Conv3d)
    torch.testing.assert_close(visual.patch_embed.proj.weight, reference.model.visual.patch_embed.proj.weight)

    grids = [(1, 8, 8), (1, 4, 6)]
    torch.manual_seed(1)
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), visual.patch_embed.proj.weight[0].numel())
    features = tiny_model.adapter.encode_images(pixel_values, grids)
    with torch.inference_mode():
        out = reference.model.visual(pixel_values, grid_thw=torch.tensor(grids))
    expected = out.pooler_output if hasattr(out, "pooler_output") else out
    torch.testing.assert_close(torch.cat([f.embeddings for f in features]), expected, rtol=1e-4, atol=1e-5)
