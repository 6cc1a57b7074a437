"""The vision tower's patch embedding as one matrix product over whole patches or one frame
of a still image (engine/patch_embed.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

from engine.patch_embed import LinearPatchEmbed, is_patch_convolution, repeat_frame, use_linear_patch_embed


def _patch_embed(bias: bool = False) -> PatchEmbed:
    torch.manual_seed(0)
    module = PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=8)
    if bias:  # transformers' module has none; a model of another family might
        module.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=True)
    return module


@pytest.mark.parametrize("bias", [False, True])
def test_the_product_equals_the_convolution_on_whole_patches(bias):
    original = _patch_embed(bias)
    rows = torch.randn(37, 3 * 2 * 14 * 14)
    with torch.inference_mode():
        expected = original(rows)
        got = LinearPatchEmbed(original)(rows)
    assert got.shape == expected.shape == (37, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_one_frame_rows_embed_as_the_frame_repeated_over_the_temporal_patch(bias):
    """A row of one frame gives what the convolution gives for the processor's row (that
    frame repeated over the temporal axis), to float rounding: the filter is summed over
    the temporal axis, not the frame copied."""
    original = _patch_embed(bias)
    frames = torch.randn(37, 3 * 14 * 14)
    whole = repeat_frame(frames, in_channels=3, temporal=2)
    assert whole.shape == (37, 3 * 2 * 14 * 14)
    assert torch.equal(whole.view(37, 3, 2, -1)[:, :, 0], whole.view(37, 3, 2, -1)[:, :, 1])
    with torch.inference_mode():
        expected = original(whole)
        got = LinearPatchEmbed(original)(frames)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rows_of_another_width_are_refused():
    embed = LinearPatchEmbed(_patch_embed())
    with pytest.raises(ValueError, match=r"1176 .* or 588"):
        embed(torch.randn(4, 3 * 14 * 14 + 1))


def test_only_convolutions_over_whole_non_overlapping_patches_qualify():
    assert is_patch_convolution(_patch_embed().proj)
    overlapping = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(1, 7, 7))
    padded = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14), padding=1)
    grouped = torch.nn.Conv3d(3, 6, kernel_size=(2, 14, 14), stride=(2, 14, 14), groups=3)
    for conv in (overlapping, padded, grouped, torch.nn.Linear(4, 4)):
        assert not is_patch_convolution(conv)
        module = torch.nn.Module()
        module.proj = conv
        with pytest.raises(ValueError):
            LinearPatchEmbed(module)


def test_a_tower_without_a_patch_convolution_is_left_alone():
    tower = torch.nn.Module()
    tower.patch_embed = torch.nn.Module()
    tower.patch_embed.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(1, 7, 7))
    before = tower.patch_embed
    assert use_linear_patch_embed(tower) is False
    assert tower.patch_embed is before
    assert use_linear_patch_embed(torch.nn.Module()) is False


def test_the_served_tiny_model_encodes_as_the_unpatched_model_does(tiny_model, tiny_model_dir):
    """The adapter swaps the embedding in (sharing the weight), and the real vision tower's
    features for two images, from whole-patch rows and from one-frame rows, equal those of
    the model as transformers loads it given the processor's rows."""
    visual = tiny_model.model.model.visual
    assert isinstance(visual.patch_embed, LinearPatchEmbed)
    assert use_linear_patch_embed(visual) is True  # idempotent
    reference = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert isinstance(reference.model.visual.patch_embed.proj, torch.nn.Conv3d)
    assert visual.patch_embed.proj.weight.data_ptr() != reference.model.visual.patch_embed.proj.weight.data_ptr()
    torch.testing.assert_close(visual.patch_embed.proj.weight, reference.model.visual.patch_embed.proj.weight)

    grids = [(1, 8, 8), (1, 4, 6)]
    torch.manual_seed(1)
    frames = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 14 * 14)
    whole = repeat_frame(frames, in_channels=3, temporal=2)
    with torch.inference_mode():
        out = reference.model.visual(whole, grid_thw=torch.tensor(grids))
    expected = out.pooler_output if hasattr(out, "pooler_output") else out
    for rows in (whole, frames):
        features = tiny_model.adapter.encode_images(rows, grids)
        torch.testing.assert_close(torch.cat([f.embeddings for f in features]), expected, rtol=1e-4, atol=1e-5)


def test_a_tower_that_keeps_its_convolution_is_given_whole_patches(tiny_model, tiny_model_dir):
    """Where the patch embedding cannot be swapped, the adapter widens one-frame rows
    before the tower sees them (the unpatched ``PatchEmbed`` would misread them)."""
    from engine.model_adapter import Qwen2VLAdapter

    reference = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    conv = reference.model.visual.patch_embed.proj
    reference.model.visual.patch_embed.proj = torch.nn.Conv3d(  # same weights, not a "patch" conv
        3, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.kernel_size, bias=False, padding_mode="reflect"
    )
    reference.model.visual.patch_embed.proj.weight = conv.weight
    adapter = Qwen2VLAdapter(reference)
    assert not isinstance(reference.model.visual.patch_embed, LinearPatchEmbed)
    grids = [(1, 4, 6)]
    torch.manual_seed(2)
    frames = torch.randn(24, 3 * 14 * 14)
    with torch.inference_mode():
        expected = tiny_model.adapter.encode_images(frames, grids)[0].embeddings
        got = adapter.encode_images(frames, grids)[0].embeddings
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
