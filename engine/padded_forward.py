"""A ``TokenBatch`` padded into the rectangular batch transformers' own model forward
takes, for model families that ``engine.decoder_forward`` does not cover.

transformers' forward takes a rectangular batch, so rows are left-padded to the step's
longest chunk: padded queries write to the cache's padding slot and their outputs are
never read. The paged cache serves the model's attention layers through ``update``
(``PagedKVCache.bind``), and the attention gets a dense 4-D mask (row ``b``'s query at
position ``p`` sees its slots ``0..p``), which every transformers model takes as it is
(a mapping of masks per layer type, or any other mask object, only some model classes
take: a Llama model given one builds its own causal mask, wrong for left-padded rows).
The adapter (``engine.model_adapter``) binds the cache and calls the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.token_batch import TokenBatch


@dataclass(frozen=True)
class PaddedBatch:
    """``embeds`` [B, q, H], ``positions`` [P, B, q], ``slots`` [B, q] and the additive
    attention mask [B, 1, q, W x block_size] of a ``TokenBatch`` with every row
    left-padded to ``q`` = its longest row; padded queries see slot 0 only."""

    embeds: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, batch: TokenBatch, pad_slot: int) -> PaddedBatch:
        longest = max(batch.lengths)
        rows, device = batch.num_rows, batch.embeds.device
        embeds = batch.embeds.new_zeros((rows, longest, batch.embeds.shape[-1]))
        positions = batch.positions.new_zeros((batch.positions.shape[0], rows, longest))
        slots = batch.slots.new_full((rows, longest), pad_slot)
        for row, (offset, n) in enumerate(zip(batch.offsets, batch.lengths, strict=True)):
            embeds[row, longest - n :] = batch.embeds[offset : offset + n]
            positions[:, row, longest - n :] = batch.positions[:, offset : offset + n]
            slots[row, longest - n :] = batch.slots[offset : offset + n]
        # query j of row b is at context position starts[b] + lengths[b] - longest + j
        context = torch.tensor(
            [s + n for s, n in zip(batch.starts, batch.lengths, strict=True)], dtype=torch.long, device=device
        )
        query = (context.view(-1, 1) - longest + torch.arange(longest, device=device).view(1, -1)).clamp(min=0)
        return cls(embeds, positions, slots, batch.context_mask(query, batch.embeds.dtype))
