"""One language-model forward's tokens, flat: every row's new tokens one after another,
with nothing padded (docs/architecture.md, "KV cache").

The model runner builds a ``TokenBatch`` from its rows ``(sequence, n)``: the embeddings
and positions of each row's next ``n`` tokens, the cache slot each token's key and value go
to, and the blocks that hold each row's context. The adapter runs it through the model:
``engine.decoder_forward`` as it is, transformers' own forward after padding it
(``engine.padded_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class TokenBatch:
    """Row ``b`` brings ``lengths[b]`` new tokens after ``starts[b]`` tokens already in the
    cache; its tokens are rows ``offsets[b] .. offsets[b] + lengths[b]`` of ``embeds``
    [T, H], ``positions`` [P, T] (P = 3 for M-RoPE) and ``slots`` [T] (where each token's key
    and value are written). ``block_tables`` [B, W] holds each row's blocks, padded with the
    cache's padding block: a row's context (its first ``starts[b] + lengths[b]`` tokens)
    lies in its blocks, in order, ``block_size`` tokens per block."""

    embeds: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    block_size: int

    @property
    def num_rows(self) -> int:
        return len(self.lengths)

    @property
    def is_decode(self) -> bool:
        """Every row brings one token (attention over the rows' padded contexts at once)."""
        return all(n == 1 for n in self.lengths)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Index of each row's first new token in the flat tensors."""
        out, at = [], 0
        for n in self.lengths:
            out.append(at)
            at += n
        return tuple(out)

    @cached_property
    def last_tokens(self) -> torch.Tensor:
        """Index [B] of each row's last new token (the one whose logits the forward returns)."""
        ends = [offset + n - 1 for offset, n in zip(self.offsets, self.lengths, strict=True)]
        return torch.tensor(ends, dtype=torch.long, device=self.embeds.device)

    def context_blocks(self, row: int) -> torch.Tensor:
        """The blocks [k] that hold row ``row``'s context, without padding."""
        context = self.starts[row] + self.lengths[row]
        return self.block_tables[row, : -(-context // self.block_size)]

    def context_mask(self, query: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B, 1, q, W x block_size] for queries at context positions
        ``query`` [B, q]: row ``b``'s query at position ``p`` sees its context slots
        ``0..p``; later slots (the rest of its last block, the padding blocks) get the
        dtype's minimum."""
        width = self.block_tables.shape[1] * self.block_size
        seen = torch.arange(width, device=query.device)
        mask = torch.zeros((*query.shape, width), dtype=dtype, device=query.device)
        mask.masked_fill_(seen > query.unsqueeze(-1), torch.finfo(dtype).min)
        return mask.unsqueeze(1)

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``context_mask`` [B, 1, 1, W x block_size] of a decode batch: row ``b``'s one
        query is at position ``starts[b]``."""
        query = torch.tensor(self.starts, dtype=torch.long, device=self.embeds.device).view(-1, 1)
        return self.context_mask(query, dtype)
