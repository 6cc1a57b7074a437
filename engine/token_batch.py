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

# Groups a decode batch's attention is split into at most, and what one group costs in
# key elements read (``TokenBatch.decode_groups``; bench/README.md, "Decode attention by
# context length").
MAX_DECODE_GROUPS = 4
GROUP_OVERHEAD_ELEMENTS = 32768


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

    def decode_groups(self, dtype: torch.dtype, key_elements: int) -> tuple[DecodeGroup, ...]:
        """A decode batch's rows in groups of similar context length, for attention: each
        group's contexts are gathered and padded to its own longest, not the batch's.

        Rows are sorted by context and cut into ``k`` groups of equal count, ``k`` (1 to
        ``MAX_DECODE_GROUPS``) the one with the least padded key elements (slots x
        ``key_elements``, a slot's key elements in one layer) plus
        ``GROUP_OVERHEAD_ELEMENTS`` per group (the cost of a group's own operations). One
        group is the whole batch in order (``rows`` None)."""
        contexts = [start + 1 for start in self.starts]
        order = sorted(range(self.num_rows), key=contexts.__getitem__)
        bs = self.block_size

        def cost(parts: list[list[int]]) -> int:
            slots = sum(len(part) * -(-contexts[part[-1]] // bs) * bs for part in parts)
            return slots * key_elements + len(parts) * GROUP_OVERHEAD_ELEMENTS

        cuts = (
            [order[i * len(order) // k : (i + 1) * len(order) // k] for i in range(k)]
            for k in range(1, min(MAX_DECODE_GROUPS, self.num_rows) + 1)
        )
        parts = min(cuts, key=cost)  # the fewest groups among equal costs
        if len(parts) == 1:
            return (DecodeGroup(None, self.block_tables, self._decode_mask(self.block_tables, self.starts, dtype)),)
        device = self.embeds.device
        groups = []
        for part in parts:
            rows = torch.tensor(part, dtype=torch.long, device=device)
            tables = self.block_tables.index_select(0, rows)[:, : -(-contexts[part[-1]] // bs)]
            starts = tuple(self.starts[row] for row in part)
            groups.append(DecodeGroup(rows, tables, self._decode_mask(tables, starts, dtype)))
        return tuple(groups)

    def _decode_mask(self, tables: torch.Tensor, starts: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [n, 1, 1, w x block_size] for one query per row at ``starts``
        over the rows' blocks ``tables`` [n, w]: row ``b`` sees its slots ``0..starts[b]``."""
        width = tables.shape[1] * self.block_size
        query = torch.tensor(starts, dtype=torch.long, device=tables.device).view(-1, 1)
        mask = torch.zeros((len(starts), 1, 1, width), dtype=dtype, device=tables.device)
        seen = torch.arange(width, device=tables.device)
        mask.masked_fill_((seen > query).view(len(starts), 1, 1, width), torch.finfo(dtype).min)
        return mask


@dataclass(frozen=True)
class DecodeGroup:
    """Rows of a decode batch attended together: their indices ``rows`` [n] in the batch
    (``None``: every row, in order), their blocks ``tables`` [n, w] (the group's widest
    context, padded) and the additive ``mask`` [n, 1, 1, w x block_size]."""

    rows: torch.Tensor | None
    tables: torch.Tensor
    mask: torch.Tensor
