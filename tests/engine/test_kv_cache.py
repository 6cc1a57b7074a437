"""The batch KV cache: in-place growth, row selection, left trimming and merging."""

from __future__ import annotations

import torch

from engine.kv_cache import (
    RESERVE_TOKENS,
    GrowableLayer,
    cache_nbytes,
    left_pad,
    merge_caches,
    new_batch_cache,
)


def kv(batch: int, length: int, start: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [B, 2, L, 4] numbered by position so tests can see which entries moved where."""
    pos = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1) + start
    rows = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1) * 1000
    keys = (pos + rows).expand(batch, 2, length, 4).clone()
    return keys, -keys


def test_update_appends_and_returns_everything_so_far():
    layer = GrowableLayer()
    k1, v1 = kv(2, 5)
    k2, v2 = kv(2, 1, start=5)
    layer.update(k1, v1)
    keys, values = layer.update(k2, v2)
    expected_k, expected_v = kv(2, 6)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    assert layer.get_seq_length() == 6


def test_appends_within_the_reserve_reuse_the_buffer():
    """Amortised O(1): a decode step writes into spare capacity instead of copying."""
    layer = GrowableLayer(*kv(1, 3))
    buffer = layer._kbuf.data_ptr()
    for step in range(RESERVE_TOKENS):
        layer.update(*kv(1, 1, start=3 + step))
    assert layer._kbuf.data_ptr() == buffer
    layer.update(*kv(1, 1, start=3 + RESERVE_TOKENS))  # past the reserve: one regrowth
    assert layer._kbuf.data_ptr() != buffer
    assert torch.equal(layer.keys, kv(1, 4 + RESERVE_TOKENS)[0])


def test_batch_select_keeps_the_chosen_rows_in_order():
    layer = GrowableLayer(*kv(3, 4))
    layer.batch_select_indices(torch.tensor([2, 0]))
    full = kv(3, 4)[0]
    assert torch.equal(layer.keys, full[[2, 0]])


def test_trim_left_drops_leading_positions():
    layer = GrowableLayer(*kv(2, 6))
    layer.trim_left(4)
    assert torch.equal(layer.keys, kv(2, 6)[0][:, :, 4:])
    assert layer.get_seq_length() == 2


def test_left_pad_pads_with_zeros_only_when_shorter():
    keys, _ = kv(1, 2, start=1)
    padded = left_pad(keys, 5)
    assert padded.shape[2] == 5
    assert torch.count_nonzero(padded[:, :, :3]) == 0
    assert torch.equal(padded[:, :, 3:], keys)
    assert left_pad(keys, 2) is keys


def test_merge_stacks_rows_left_padded_to_a_common_length():
    a = new_batch_cache(2)
    b = new_batch_cache(2)
    for layer in a.layers:
        layer.update(*kv(1, 3, start=1))
    for layer in b.layers:
        layer.update(*kv(2, 5, start=1))
    merged = merge_caches(a, b)
    assert merged.get_seq_length() == 5
    keys = merged.layers[1].keys
    assert keys.shape[0] == 3
    assert torch.count_nonzero(keys[0, :, :2]) == 0  # a's row, padded on the left
    assert torch.equal(keys[0:1, :, 2:], kv(1, 3, start=1)[0])
    assert torch.equal(keys[1:], kv(2, 5, start=1)[0])
    assert merge_caches(None, b) is b


def test_cache_nbytes_counts_both_buffers_of_every_layer():
    assert cache_nbytes(None) == 0
    cache = new_batch_cache(3)
    assert cache_nbytes(cache) == 0
    for layer in cache.layers:
        layer.update(*kv(2, 4))
    # a fresh layer starts empty with RESERVE_TOKENS of capacity; 4 tokens fit in it
    per_layer = 2 * 2 * RESERVE_TOKENS * 4 * 4  # B x H x capacity x D x 4 bytes
    assert cache_nbytes(cache) == 3 * 2 * per_layer
