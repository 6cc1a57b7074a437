"""The paged KV cache's memory: per layer, one pool of key slots and one of value slots,
``block_size`` slots per block (docs/architecture.md, "KV cache").

Which block belongs to which sequence is ``engine.block_manager``'s business; this module
only moves tensors. Each attention layer ``write``s its new keys and values into their
slots and ``gather``s the blocks that hold a row's context, whole, into one contiguous
tensor (``engine.decoder_forward``; transformers' own forward does both through the
``Cache`` hook ``update`` after the adapter ``bind``s the step's slots and blocks).
Positions past a row's context are masked, and they hold zeros, never stale values: a
block is zeroed (``zero_blocks``) in the forward where it becomes a row's last block,
before anything is written into it, and only that row writes into it afterwards. A masked
position still enters the attention's arithmetic (weight zero times value), so a stale
NaN from unwritten memory, or from another sequence that once held the block, would
poison the row.
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
    def key_elements(self) -> int:
        """Key elements one slot holds in one layer (kv heads x head dim)."""
        return self.key_pools[0][0].numel()

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.key_pools + self.value_pools)

    def zero_blocks(self, blocks: Sequence[int]) -> None:
        """Zero ``blocks`` in every layer: each forward does it for the blocks that become
        rows' last blocks in it, before anything is written into them."""
        if blocks:
            index = torch.tensor(blocks, dtype=torch.long, device=self.key_pools[0].device)
            for pool in self.key_pools + self.value_pools:
                pool.view(self.num_blocks + 1, -1).index_fill_(0, index, 0)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys`` and ``values`` [T, heads, dim] of layer ``layer`` at ``slots`` [T]."""
        self.key_pools[layer].index_copy_(0, slots, keys)
        self.value_pools[layer].index_copy_(0, slots, values)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [len(blocks) x block_size, heads, dim] of layer ``layer`` held
        in ``blocks`` [k], whole blocks in order (one copy)."""
        keys, values = self.key_pools[layer], self.value_pools[layer]
        by_block = (self.num_blocks + 1, self.block_size, *keys.shape[1:])
        rows = (-1, *keys.shape[1:])
        return (
            keys.view(by_block).index_select(0, blocks).view(rows),
            values.view(by_block).index_select(0, blocks).view(rows),
        )

    def bind(self, write: torch.Tensor, blocks: torch.Tensor) -> None:
        """For transformers' own forward (``update``): the slots ``write`` [B, q] of its new
        tokens and ``blocks`` [B, W] whose slots form each row's context (positions ``0..W
        x block_size``, the row's tokens first)."""
        self._write = write.reshape(-1)
        self._blocks = blocks.reshape(-1)
        self._context = blocks.shape[1] * self.block_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' cache hook: write the new keys and values [B, heads, q, dim] to the
        bound slots and return the rows' contexts [B, heads, W x block_size, dim]."""
        batch, heads, q, dim = key_states.shape
        self.write(
            layer_idx,
            self._write,
            key_states.transpose(1, 2).reshape(batch * q, heads, dim),
            value_states.transpose(1, 2).reshape(batch * q, heads, dim),
        )
        k, v = self.gather(layer_idx, self._blocks)
        shape = (batch, self._context, heads, dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always explicit; the model never needs this

    def get_mask_sizes(self, *args, **kwargs):
        raise RuntimeError("the paged KV cache takes a prepared attention mask")
