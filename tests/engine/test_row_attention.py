"""Prefill attention row by row (engine/row_attention.py) equals the masked attention it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional

from engine.model_adapter import CausalLMAdapter
from engine.row_attention import ROW_ATTENTION, PrefillRows, install_row_attention, row_attention

MIN = torch.finfo(torch.float32).min


def dense_mask(lengths, starts, longest, context):
    """The runner's dense mask for left-padded rows: query ``i`` of row ``b`` (at absolute
    position ``start + i``) sees context positions ``0..start + i``; padded queries see
    position 0 only."""
    mask = torch.full((len(lengths), 1, longest, context), MIN)
    for b, (n, start) in enumerate(zip(lengths, starts, strict=True)):
        mask[b, 0, : longest - n, 0] = 0.0
        for i in range(n):
            mask[b, 0, longest - n + i, : start + i + 1] = 0.0
    return mask


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_rows_attend_as_the_dense_mask_makes_them(kv_heads):
    """Fresh prompts, a continuing chunk, a prefix-cache hit and a one-token chunk: each
    real query position gets what the masked attention gives it; padded positions get zeros."""
    torch.manual_seed(0)
    lengths, starts = (7, 3, 5, 1), (0, 4, 9, 2)
    longest, context = max(lengths), max(s + n for s, n in zip(starts, lengths, strict=True))
    query = torch.randn(4, 4, longest, 16)
    key = torch.randn(4, kv_heads, context, 16)
    value = torch.randn(4, kv_heads, context, 16)
    expected = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=dense_mask(lengths, starts, longest, context), scale=0.25, enable_gqa=kv_heads != 4
    ).transpose(1, 2)
    got = PrefillRows(lengths, starts, longest).attend(query, key, value, 0.25)
    assert got.shape == (4, longest, 4, 16)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, longest - n :], expected[b, longest - n :], rtol=1e-5, atol=1e-5)
        assert not got[b, : longest - n].any()


def test_other_masks_go_to_transformers_sdpa_unchanged():
    torch.manual_seed(1)
    query, key, value = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 6, 16), torch.randn(3, 2, 6, 16)
    mask = torch.zeros(3, 1, 1, 6)
    mask[0, ..., 4:] = MIN
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    out, weights = row_attention(module, query, key, value, mask, scaling=0.25)
    expected = functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    assert weights is None


def test_the_tiny_models_language_layers_use_it_and_its_vision_tower_does_not(tiny_model):
    assert tiny_model.adapter.row_attention is True
    assert tiny_model.model.config.get_text_config()._attn_implementation == ROW_ATTENTION
    assert tiny_model.model.config.vision_config._attn_implementation == "sdpa"


def test_sliding_windows_and_other_implementations_keep_their_attention(tiny_model):
    """A copy of the model's config with a sliding-window layer, or eager attention, is left as it is."""
    for change in ({"layer_types": ["full_attention", "sliding_attention"]}, {"_attn_implementation": "eager"}):
        model = torch.nn.Module()
        model.config = copy.deepcopy(tiny_model.model.config)
        text = model.config.get_text_config()
        text._attn_implementation = "sdpa"
        for name, value in change.items():
            setattr(text, name, value)
        before = text._attn_implementation
        assert install_row_attention(model) is False
        assert text._attn_implementation == before


def test_a_text_model_without_sdpa_gets_the_dense_mask():
    class Config:
        _attn_implementation = "eager"

        def get_text_config(self):
            return self

    model = torch.nn.Module()
    model.config = Config()
    model.forward = lambda inputs_embeds=None, cache=None: None
    assert CausalLMAdapter(model).row_attention is False
