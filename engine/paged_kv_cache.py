"""The paged KV cache's memory: per layer, one pool of key slots and one of value slots,
``block_size`` slots per block (docs/architecture.md, "KV cache").

Which block belongs to which sequence is ``engine.block_manager``'s business; this module
only moves tensors. Before each forward the model runner ``bind``s the step's slots and
blocks: where each new token's key and value go (``write``), and the blocks that hold each
row's context (``blocks``, padded with the padding block). Each attention layer then calls
``update``, which writes the new keys and values into their slots and returns the rows'
blocks gathered whole into one contiguous ``[B, heads, blocks x block_size, head_dim]``
view for the model's own attention function. Positions past a row's context are masked
(the runner's mask, or ``PrefillRows``), and they hold zeros, never stale values: a block
is zeroed in the forward where it becomes a row's last block, before anything is written
into it (``fresh``), and only that row writes into it afterwards. A masked position
still enters the attention's arithmetic (weight zero times value), so a stale NaN from
unwritten memory, or from another sequence that once held the block, would poison the row.
Gathering whole blocks moves a row's context in ``block_size`` times fewer pieces than
slot by slot; the copy is bound by memory bandwidth either way, so the step loop gained
about 3 % (bench/README.md, "Contexts read by whole blocks"). Nothing is copied when the
batch changes: a row is just a block table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache(Cache):
    """``num_blocks`` blocks of ``block_size`` slots per layer, plus one padding block
    (index ``num_blocks``: zeros, read by padded context positions, written by padded
    queries, never handed out)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(layers=[])
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pad_block = num_blocks
        self.pad_slot = num_blocks * block_size
        slots = (num_blocks + 1) * block_size
        shape = (slots, kv_heads, head_dim)
        # empty, not zeros: a slot is read only after it was written (or is padding)
        self.key_pools = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_pools = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for pool in self.key_pools + self.value_pools:
            pool[self.pad_slot :].zero_()
        self._write: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None
        self._context = 0

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.key_pools + self.value_pools)

    def bind(self, write: torch.Tensor, blocks: torch.Tensor, fresh: Sequence[int] = ()) -> None:
        """The next forward's slots and blocks: ``write`` [B, q] for its new tokens,
        ``blocks`` [B, W] whose slots form each row's context (positions ``0..W x
        block_size``, the row's tokens first). Zeroes the ``fresh`` blocks (rows' new last
        blocks) in every layer now, before the forward writes into them."""
        self._write = write.reshape(-1)
        self._blocks = blocks.reshape(-1)
        self._context = blocks.shape[1] * self.block_size
        if fresh:
            index = torch.tensor(fresh, dtype=torch.long, device=write.device)
            for pool in self.key_pools + self.value_pools:
                pool.view(self.num_blocks + 1, -1).index_fill_(0, index, 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        batch, heads, q, dim = key_states.shape
        keys, values = self.key_pools[layer_idx], self.value_pools[layer_idx]
        keys.index_copy_(0, self._write, key_states.transpose(1, 2).reshape(batch * q, heads, dim))
        values.index_copy_(0, self._write, value_states.transpose(1, 2).reshape(batch * q, heads, dim))
        by_block = (self.num_blocks + 1, self.block_size, heads, dim)
        k = keys.view(by_block).index_select(0, self._blocks).view(batch, self._context, heads, dim).transpose(1, 2)
        v = values.view(by_block).index_select(0, self._blocks).view(batch, self._context, heads, dim).transpose(1, 2)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always explicit; the model never needs this

    def get_mask_sizes(self, *args, **kwargs):
        raise RuntimeError("the paged KV cache takes a prepared attention mask")
