"""The running batch's KV cache: HF cache layers that grow in place and rows that come and go.

Rows are left-padded to one common length, so every row appends at the same index; an
attention mask (kept by the model runner) hides each row's padding. Appending writes into
spare capacity (amortised O(1), unlike ``DynamicLayer``'s concatenation per step);
membership changes (rows joining, leaving, padding trimmed) rebuild the buffers once.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

RESERVE_TOKENS = 64


class GrowableLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views into a larger buffer."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        if keys is not None:
            self._adopt(keys, values)

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, reserve: int = RESERVE_TOKENS) -> None:
        batch, heads, length, dim = keys.shape
        self._kbuf = keys.new_empty((batch, heads, length + reserve, dim))
        self._vbuf = values.new_empty((batch, values.shape[1], length + reserve, values.shape[3]))
        self._kbuf[:, :, :length] = keys
        self._vbuf[:, :, :length] = values
        self._len = length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._kbuf[:, :, : self._len]
        self.values = self._vbuf[:, :, : self._len]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._adopt(key_states[:, :, :0], value_states[:, :, :0])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._len + n > self._kbuf.shape[2]:
            keys, values = self.keys, self.values
            self._adopt(keys, values, reserve=max(RESERVE_TOKENS, self._len + n))
        self._kbuf[:, :, self._len : self._len + n] = key_states
        self._vbuf[:, :, self._len : self._len + n] = value_states
        self._len += n
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._adopt(self.keys[indices], self.values[indices])

    def trim_left(self, n: int) -> None:
        """Drop the first ``n`` positions of every row (padding no row needs any more)."""
        if self.is_initialized and n > 0:
            self._adopt(self.keys[:, :, n:], self.values[:, :, n:])

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self._kbuf.numel() * self._kbuf.element_size() * 2


def new_batch_cache(num_layers: int) -> Cache:
    return Cache(layers=[GrowableLayer() for _ in range(num_layers)])


def left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 2 (sequence) of a [B, H, T, D] tensor on the left with zeros to ``length``."""
    missing = length - t.shape[2]
    if missing <= 0:
        return t
    pad = t.new_zeros((t.shape[0], t.shape[1], missing, t.shape[3]))
    return torch.cat([pad, t], dim=2)


def merge_caches(a: Cache | None, b: Cache) -> Cache:
    """Stack the rows of ``b`` under those of ``a``, left-padding both to a common length."""
    if a is None or not a.layers or not a.layers[0].is_initialized:
        return b
    length = max(a.get_seq_length(), b.get_seq_length())
    layers = []
    for la, lb in zip(a.layers, b.layers, strict=True):
        keys = torch.cat([left_pad(la.keys, length), left_pad(lb.keys, length)], dim=0)
        values = torch.cat([left_pad(la.values, length), left_pad(lb.values, length)], dim=0)
        layers.append(GrowableLayer(keys, values))
    return Cache(layers=layers)


def cache_nbytes(cache: Cache | None) -> int:
    if cache is None:
        return 0
    return sum(layer.nbytes() for layer in cache.layers if isinstance(layer, GrowableLayer))
