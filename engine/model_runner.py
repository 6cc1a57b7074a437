"""Runs the language model over a step's rows with the paged KV cache.

Each forward takes rows ``(seq, n)``: the next ``n`` tokens of ``seq`` (its prompt, then
its outputs) from ``seq.num_computed_tokens`` on. A decode is ``n = 1`` (the last sampled
token); a prefill chunk is any ``n``. Rows are left-padded to the step's longest ``n``
(padded queries write to the padding block and attend to one slot), their contexts are
read through their block tables, whole blocks (``engine.paged_kv_cache``: positions past
a row's context hold zeros), and the attention mask is built here: row ``b``'s query at
position ``p`` sees its own slots ``0..p`` (a prefill
forward passes the rows' lengths instead, ``engine.row_attention``, where the model's
attention allows it). Positions
are explicit (M-RoPE rows from the whole prompt, sliced per chunk; later tokens at
``t + rope_delta``), so a chunked or prefix-hit prompt gets exactly the positions and
image embeddings of a whole one.

Plain synchronous code, called from the engine's step thread only, one call at a time.
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.model_adapter import CausalLMAdapter
from engine.paged_kv_cache import PagedKVCache, kv_bytes_per_token
from engine.row_attention import PrefillRows
from engine.sequence import Sequence


def kv_layout(adapter: CausalLMAdapter) -> tuple[int, int, int, torch.dtype]:
    """(layers, kv heads, head dim, dtype) of the model's KV cache."""
    cfg = adapter.text_config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(adapter.model.parameters()).dtype
    return adapter.num_layers, kv_heads, head_dim, dtype


def bytes_per_token(adapter: CausalLMAdapter) -> int:
    return kv_bytes_per_token(*kv_layout(adapter))


class ModelRunner:
    """The model, its paged KV cache, and per-row positions. ``blocks`` (shared with the
    scheduler) says which blocks each sequence holds; default: a pool for 64 sequences
    of 4,096 tokens in blocks of 16."""

    def __init__(self, adapter: CausalLMAdapter, device: torch.device, blocks: BlockManager | None = None) -> None:
        self.adapter = adapter
        self.device = device
        self.blocks = blocks or BlockManager(
            64 * 4096 // 16, 16, image_token_id=getattr(adapter, "image_token_id", None)
        )
        layers, kv_heads, head_dim, dtype = kv_layout(adapter)
        self.cache = PagedKVCache(
            num_layers=layers,
            num_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
        )
        self.dtype = dtype
        self._rows: dict[int, Sequence] = {}
        self._positions: dict[int, tuple[torch.Tensor, int]] = {}  # seq_id -> prompt positions [P, L], delta

    @property
    def rows(self) -> list[Sequence]:
        """Sequences with tokens in the cache, in the order they first ran."""
        return list(self._rows.values())

    def cache_tokens(self) -> int:
        """Slots in blocks held by sequences (cached-only blocks not counted)."""
        blocks = self.blocks
        return (blocks.num_blocks - blocks.num_free) * blocks.block_size

    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def reset(self) -> None:
        """Forget every row's positions (after an unexpected failure); blocks are the
        scheduler's to free."""
        self._rows.clear()
        self._positions.clear()

    def drop(self, leaving: list[Sequence]) -> None:
        """Forget the rows of ``leaving`` (their blocks are freed by the scheduler)."""
        for seq in leaving:
            self._rows.pop(seq.seq_id, None)
            self._positions.pop(seq.seq_id, None)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last sampled token; return next-token logits [B, V]."""
        return self.forward([(seq, 1) for seq in seqs])

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Run the next ``n`` tokens of each sequence; logits [k, V] of each chunk's last
        token (meaningful where the chunk ends the sequence's tokens)."""
        return self.forward(chunks)

    @torch.inference_mode()
    def forward(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """One forward over ``rows``; on success each sequence's computed count advances
        by its ``n`` (and its newly full blocks become reusable)."""
        device, bs = self.device, self.blocks.block_size
        longest = max(n for _, n in rows)
        starts = [seq.num_computed_tokens for seq, _ in rows]
        lengths = [n for _, n in rows]
        for (seq, n), start in zip(rows, starts, strict=True):
            if len(seq.block_table) * bs < start + n:
                raise RuntimeError(f"sequence {seq.seq_id} has no blocks for tokens {start}..{start + n}")
            self._rows.setdefault(seq.seq_id, seq)
        if longest == 1 and all(start >= seq.prompt_len for (seq, _), start in zip(rows, starts, strict=True)):
            batch_embeds, positions = self._decode_inputs(rows, starts)
        else:
            batch_embeds, positions = self._chunk_inputs(rows, starts, longest)

        start_t = torch.tensor(starts, dtype=torch.long, device=device)
        n_t = torch.tensor(lengths, dtype=torch.long, device=device)
        context = start_t + n_t  # tokens each row sees after this forward
        # each row reads the blocks that hold its context, whole; a block becomes a row's
        # last block (``fresh``) in the forward that first writes into it
        needed, fresh = [], []
        for (seq, _), start, n in zip(rows, starts, lengths, strict=True):
            need = self.blocks.blocks_for(start + n)
            needed.append(need)
            if need > self.blocks.blocks_for(start):
                fresh.append(seq.block_table[need - 1])
        width = max(needed)
        pad = [self.cache.pad_block]
        padded = [seq.block_table[:need] + pad * (width - need) for (seq, _), need in zip(rows, needed, strict=True)]
        tables = torch.tensor(padded, dtype=torch.long, device=device)

        # absolute token position of each query; padded queries (-1) write to the pad slot
        j = torch.arange(longest, device=device).view(1, -1)
        qpos = context.view(-1, 1) - longest + j  # [B, q]
        real = qpos >= start_t.view(-1, 1)
        write = _slots(tables, qpos.clamp(min=0), bs)
        write = torch.where(real, write, torch.full_like(write, self.cache.pad_slot))
        if longest > 1 and self.adapter.row_attention:  # attention row by row, unpadded
            mask: torch.Tensor | PrefillRows = PrefillRows(tuple(lengths), tuple(starts), longest)
        else:  # context position t of a row: its blocks' slots, whole; t < context are its tokens
            t = torch.arange(width * bs, device=device).view(1, 1, -1)
            allowed = t <= qpos.clamp(min=0).unsqueeze(-1)  # [B, q, K]
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            mask = mask.unsqueeze(1)
        self.cache.bind(write, tables, fresh)
        logits = self.adapter.forward(
            batch_embeds, positions, {"full_attention": mask, "sliding_attention": mask}, self.cache
        )
        for seq, n in rows:
            self.blocks.computed(seq, n)
        return logits

    def _decode_inputs(self, rows: list[tuple[Sequence, int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, 1, H] and positions [1, B, 1] of one output token per row."""
        ids = [seq.output_ids[start - seq.prompt_len] for (seq, _), start in zip(rows, starts, strict=True)]
        embeds = self.adapter.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device)).unsqueeze(1)
        pos = [start + seq.rope_delta for (seq, _), start in zip(rows, starts, strict=True)]
        return embeds, torch.tensor(pos, dtype=torch.long, device=self.device).view(1, -1, 1)

    def _chunk_inputs(
        self, rows: list[tuple[Sequence, int]], starts: list[int], longest: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, q, H] and positions [P, B, q] of each row's chunk, left-padded."""
        batch = len(rows)
        positions = torch.zeros((self.adapter.position_rows, batch, longest), dtype=torch.long, device=self.device)
        embeds = []
        for i, ((seq, n), start) in enumerate(zip(rows, starts, strict=True)):
            e, p = self._inputs(seq, start, start + n)
            embeds.append(e)
            positions[:, i, longest - n :] = p
        batch_embeds = embeds[0].new_zeros((batch, longest, embeds[0].shape[-1]))
        for i, e in enumerate(embeds):
            batch_embeds[i, longest - e.shape[0] :] = e
        return batch_embeds, positions

    def _inputs(self, seq: Sequence, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [n, H] and positions [P, n] of tokens ``start..end`` of ``seq``."""
        prompt_len = seq.prompt_len
        parts, pos = [], []
        if start < prompt_len:
            stop = min(end, prompt_len)
            parts.append(self.adapter.embed_prompt_range(seq.prompt, start, stop, self.device))
            full, delta = self._prompt_positions(seq)
            p = full[:, start:stop]
            pos.append(p.expand(self.adapter.position_rows, -1) if p.shape[0] == 1 else p)
        else:
            _, delta = self._prompt_positions(seq)
        if end > prompt_len:
            first = max(start, prompt_len)
            ids = seq.output_ids[first - prompt_len : end - prompt_len]
            parts.append(self.adapter.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device)))
            p = torch.arange(first, end, device=self.device) + delta
            pos.append(p.view(1, -1).expand(self.adapter.position_rows, -1))
        return torch.cat(parts), torch.cat(pos, dim=1)

    def _prompt_positions(self, seq: Sequence) -> tuple[torch.Tensor, int]:
        known = self._positions.get(seq.seq_id)
        if known is None:
            known = self.adapter.prompt_positions(seq.prompt, self.device)
            self._positions[seq.seq_id] = known
            seq.rope_delta = known[1]
        return known


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot of each token position [B, n] through the rows' block tables [B, blocks]."""
    block_index = (positions // block_size).clamp(max=tables.shape[1] - 1)
    return tables.gather(1, block_index) * block_size + positions % block_size
